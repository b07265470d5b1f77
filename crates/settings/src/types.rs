//! Setting types that validate when the settings are read and keep secrets out of
//! `--print-config`, `Debug` and logs.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// What a secret prints as.
pub const REDACTED: &str = "REDACTED";

/// A value that is never printed: `Debug` and `Serialize` show [`REDACTED`]. Read it with
/// [`Secret::expose`] where it is used.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret<T>(T);

impl<T> Secret<T> {
    pub fn new(value: T) -> Self {
        Self(value)
    }

    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl<T> Serialize for Secret<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(REDACTED)
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Secret<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        T::deserialize(deserializer).map(Self)
    }
}

/// `s` with the password of a URL (`user:password@`, or a `password=` query parameter)
/// replaced by [`REDACTED`]; anything that is not such a URL unchanged.
pub fn redact_url(s: &str) -> String {
    let Ok(mut url) = url::Url::parse(s) else {
        return redact_unparsed(s);
    };
    let mut changed = false;
    if url.password().is_some() {
        changed = url.set_password(Some(REDACTED)).is_ok();
    }
    if url.query_pairs().any(|(k, _)| k == "password") {
        let pairs: Vec<(String, String)> = url
            .query_pairs()
            .map(|(k, v)| {
                let v = if k == "password" {
                    REDACTED.to_string()
                } else {
                    v.into_owned()
                };
                (k.into_owned(), v)
            })
            .collect();
        url.query_pairs_mut().clear().extend_pairs(pairs);
        changed = true;
    }
    if changed {
        url.to_string()
    } else {
        s.to_string()
    }
}

/// [`redact_url`] for a URL the parser refused (a bad port, say): the text between the
/// `:` of `user:password` and the `@`, and every `password=` value, are replaced.
fn redact_unparsed(s: &str) -> String {
    let mut out = s.to_string();
    if let Some(start) = out.find("://").map(|i| i + 3) {
        let authority_end = out[start..].find('/').map_or(out.len(), |i| start + i);
        if let Some(at) = out[start..authority_end].rfind('@').map(|i| start + i)
            && let Some(colon) = out[start..at].find(':').map(|i| start + i)
        {
            out.replace_range(colon + 1..at, REDACTED);
        }
    }
    let mut from = 0;
    while let Some(i) = out[from..]
        .find("password=")
        .map(|i| from + i + "password=".len())
    {
        let end = out[i..].find('&').map_or(out.len(), |e| i + e);
        out.replace_range(i..end, REDACTED);
        from = i + REDACTED.len();
    }
    out
}

/// A database URL whose syntax was checked when the settings were read: `postgres://`,
/// `postgresql://` or `sqlite:`, parseable as a URL. Whether the server answers is the
/// store's business at start. Printed with its password redacted.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    /// The URL with its password, for connecting.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with its password replaced by [`REDACTED`].
    pub fn redacted(&self) -> String {
        redact_url(&self.0)
    }
}

impl std::str::FromStr for DatabaseUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let scheme = s.split_once(':').map(|(scheme, _)| scheme);
        match scheme {
            Some("postgres" | "postgresql") if !s.contains("://") => {
                return Err("a Postgres URL starts with postgres://".into());
            }
            Some("postgres" | "postgresql" | "sqlite") => {}
            _ => {
                return Err(
                    "the scheme must be postgres://, postgresql:// or sqlite: (e.g. \
                     postgres://user:password@host:5432/db, sqlite://herald-ipam.db?mode=rwc)"
                        .into(),
                );
            }
        }
        // The parser's message never echoes the URL, so no password leaks through it.
        url::Url::parse(s).map_err(|e| format!("not a valid URL: {e}"))?;
        Ok(Self(s.to_string()))
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl Serialize for DatabaseUrl {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.redacted())
    }
}

impl<'de> Deserialize<'de> for DatabaseUrl {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// An `http://` or `https://` URL with a host, checked when the settings are read (a
/// gRPC endpoint without a scheme would otherwise be retried for ever).
#[derive(Clone, PartialEq, Eq)]
pub struct HttpEndpoint(String);

impl HttpEndpoint {
    /// [`crate::DEFAULT_IPAM_ENDPOINT`].
    pub fn default_ipam() -> Self {
        Self(crate::DEFAULT_IPAM_ENDPOINT.to_string())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for HttpEndpoint {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let hint = || format!("write it with a scheme, like http://{}", s.trim());
        let url = match url::Url::parse(s) {
            Ok(url) => url,
            Err(url::ParseError::RelativeUrlWithoutBase) => {
                return Err(format!("no scheme: {}", hint()));
            }
            Err(e) => return Err(format!("not a valid URL: {e}")),
        };
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!(
                "the scheme must be http or https, not {:?} ({})",
                url.scheme(),
                hint()
            ));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err("no host".into());
        }
        Ok(Self(s.to_string()))
    }
}

impl fmt::Debug for HttpEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl fmt::Display for HttpEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for HttpEndpoint {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for HttpEndpoint {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Durations as `humantime` writes them (`500ms`, `10s`, `2m`, `1h 30m`), for
/// `#[serde(with = "herald_settings::duration")]`.
pub mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(deserializer)?;
        humantime::parse_duration(&s).map_err(|e| {
            serde::de::Error::custom(format!("not a duration like 500ms, 10s or 2m: {e}"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_urls() {
        for ok in [
            "postgres://herald:pw@db:5432/herald",
            "postgresql://h@127.0.0.1/h?sslmode=disable",
            "postgres:///herald?host=/var/run/postgresql&user=herald",
            "sqlite://herald-ipam.db?mode=rwc",
            "sqlite::memory:",
        ] {
            assert!(ok.parse::<DatabaseUrl>().is_ok(), "{ok}");
        }
        for bad in [
            "mysql://h@db/h",
            "db:5432",
            "postgres:herald",
            "postgres://h@db:99999/h",
        ] {
            assert!(bad.parse::<DatabaseUrl>().is_err(), "{bad}");
        }
    }

    #[test]
    fn passwords_are_redacted() {
        let url: DatabaseUrl = "postgres://herald:hunter2@db:5432/herald"
            .parse()
            .unwrap_or_else(|e| panic!("{e}"));
        for shown in [
            url.to_string(),
            format!("{url:?}"),
            serde_json::to_string(&url).unwrap_or_default(),
        ] {
            assert!(!shown.contains("hunter2"), "{shown}");
            assert!(shown.contains(REDACTED), "{shown}");
        }
        assert_eq!(url.expose(), "postgres://herald:hunter2@db:5432/herald");
        let q = redact_url("postgres://db/h?user=a&password=hunter2");
        assert!(!q.contains("hunter2") && q.contains("user=a"), "{q}");
        assert_eq!(redact_url("not a url"), "not a url");
        let bad_port = redact_url("postgres://u:hunter2@db:999999/x?password=hunter2&a=b");
        assert_eq!(
            bad_port,
            "postgres://u:REDACTED@db:999999/x?password=REDACTED&a=b"
        );
        let secret = Secret::new("hunter2".to_string());
        assert_eq!(format!("{secret:?}"), REDACTED);
        assert_eq!(
            serde_json::to_string(&secret).unwrap_or_default(),
            format!("\"{REDACTED}\"")
        );
    }

    #[test]
    fn endpoints_need_a_scheme() {
        assert!("http://127.0.0.1:50051".parse::<HttpEndpoint>().is_ok());
        assert!(
            "https://ipam.herald.svc:443"
                .parse::<HttpEndpoint>()
                .is_ok()
        );
        assert!("http://[::1]:50051".parse::<HttpEndpoint>().is_ok());
        for bad in ["127.0.0.1:50051", "localhost:50051", "ftp://x", "http://"] {
            let e = bad.parse::<HttpEndpoint>().err();
            assert!(e.is_some(), "{bad}");
        }
        let e = "127.0.0.1:50051".parse::<HttpEndpoint>().err();
        assert!(e.is_some_and(|e| e.contains("http://127.0.0.1:50051")));
    }
}
