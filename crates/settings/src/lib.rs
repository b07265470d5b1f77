//! Settings every Herald binary reads the same way, layered with the `config` crate:
//! built-in defaults < a settings file (`--config FILE`, TOML or YAML) < `HERALD_…`
//! environment variables < flags.
//!
//! A setting has one name everywhere: the key `report_interval` in the file is
//! `HERALD_REPORT_INTERVAL` in the environment and `--report-interval` on the command line.
//! Each binary has one serde settings struct (its keys, types and defaults) and one clap
//! struct whose flags are all `Option<String>` with `env`: clap reads the command line
//! and the environment, [`load`] sorts what it read into the environment layer and the flag
//! layer by where clap found it, so a flag that was not given never hides the file, and
//! every value, wherever it came from, is parsed and validated by the same serde types.
//!
//! A key the binary does not know, a value that does not parse and a file that cannot be
//! read or parsed are errors naming the key, the value (cut if long, passwords redacted),
//! where it came from and why ([`SettingsError`]).

mod types;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use config::{Config, ConfigError, FileFormat, Format, Map as HashMap, Source, Value, ValueKind};
use serde::Serialize;
use serde::de::DeserializeOwned;

pub use types::{DatabaseUrl, HttpEndpoint, REDACTED, Secret, duration, redact_url};

/// Where herald-ipam listens unless told otherwise: the `ipam_endpoint` default of the
/// binaries that call it.
pub const DEFAULT_IPAM_ENDPOINT: &str = "http://127.0.0.1:50051";
/// Prefix of every setting's environment variable.
pub const ENV_PREFIX: &str = "HERALD_";
/// Longest echo of a bad value in an error: enough to recognise it, never a whole file.
const MAX_ECHO_CHARS: usize = 80;
/// A parser's message quotes the offending line; enough for that and the position.
const MAX_PARSE_ERROR_CHARS: usize = 600;

/// One binary's settings: keys, types and defaults. Every field is a key; the struct
/// carries `#[serde(default)]` so a key left out keeps its default.
pub trait Settings: Serialize + DeserializeOwned + Default {
    /// Checks that span several keys or need more than the type says, after every key
    /// parsed. The error names the key it blames.
    fn validate(&self) -> Result<(), Invalid> {
        Ok(())
    }
}

/// A value that parsed but cannot be used, from [`Settings::validate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub key: &'static str,
    pub reason: String,
}

/// The flags every binary has besides its settings.
#[derive(Debug, Clone, clap::Args)]
pub struct CommonArgs {
    /// Settings file, TOML (`.toml`) or YAML (`.yaml`, `.yml`). Its keys are the long flag
    /// names with `_` for `-`; environment variables and flags override it.
    #[arg(long, env = "HERALD_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Print the effective settings (defaults, file, environment and flags applied;
    /// secrets redacted) as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
    /// Log format: `plain` (for people) or `json` (one object per line, for log
    /// pipelines). `RUST_LOG` filters the logs (default `info`). [default: plain]
    #[arg(long, env = "HERALD_LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<String>,
    /// Export traces over OTLP/gRPC to this collector, an `http://` or `https://` URL
    /// (like http://127.0.0.1:4317). `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES` and
    /// `OTEL_TRACES_SAMPLER`/`_ARG` are honoured. Unset: no spans are exported
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", value_name = "URL")]
    pub otlp_endpoint: Option<String>,
}

/// The IPAM endpoint flag, for the binaries that call herald-ipam.
#[derive(Debug, Clone, clap::Args)]
pub struct IpamEndpointArg {
    /// herald-ipam's gRPC endpoint, an `http://` or `https://` URL
    /// [default: http://127.0.0.1:50051]
    #[arg(long, env = "HERALD_IPAM_ENDPOINT", value_name = "URL")]
    pub ipam_endpoint: Option<String>,
}

/// The mutual-TLS flags of the binaries that call herald-ipam.
#[derive(Debug, Clone, clap::Args)]
pub struct IpamTlsArgs {
    /// This client's certificate chain (PEM); with --tls-key and --tls-ca it calls
    /// herald-ipam over mutual TLS. Reloaded when the file changes
    #[arg(long, env = "HERALD_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<String>,
    /// The private key of --tls-cert (PEM)
    #[arg(long, env = "HERALD_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<String>,
    /// The CA bundle (PEM) herald-ipam's certificate must chain to
    #[arg(long, env = "HERALD_TLS_CA", value_name = "FILE")]
    pub tls_ca: Option<String>,
    /// The name herald-ipam's certificate must carry; by default the host of
    /// --ipam-endpoint
    #[arg(long, env = "HERALD_IPAM_SERVER_NAME", value_name = "NAME")]
    pub ipam_server_name: Option<String>,
}

/// Mutual TLS needs all three files or none: the key of the first one missing when some
/// are set.
pub fn check_tls_trio(set: [(&'static str, bool); 3]) -> Result<(), Invalid> {
    if set.iter().any(|(_, s)| *s)
        && let Some((missing, _)) = set.iter().find(|(_, s)| !*s)
    {
        let names: Vec<&str> = set.iter().map(|(k, _)| *k).collect();
        return Err(Invalid {
            key: missing,
            reason: format!("mutual TLS needs all three of {}", names.join(", ")),
        });
    }
    Ok(())
}

/// Why the settings could not be read. Each names what was wrong and where it came from.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("cannot read settings file {}: {reason}", path.display())]
    Read { path: PathBuf, reason: String },
    #[error("cannot parse settings file {} as {format}: {reason}", path.display())]
    Parse {
        path: PathBuf,
        format: &'static str,
        reason: String,
    },
    #[error(
        "settings file {}: unknown key `{key}` (value {value}); known keys: {known}",
        path.display()
    )]
    UnknownKey {
        path: PathBuf,
        key: String,
        value: String,
        known: String,
    },
    #[error("setting `{key}` = {value} from {origin}: {reason}")]
    Value {
        key: String,
        value: String,
        origin: String,
        reason: String,
    },
    #[error("settings: {0}")]
    Other(String),
}

/// Parses the command line of `A` (exiting as clap does for `--help`, `--version` and
/// malformed flags) and reads the settings of `S`. With `--print-config` it prints them and
/// exits 0; settings that cannot be read are reported on stderr with exit status 2, before
/// anything starts.
pub fn start<A, S>() -> S
where
    A: clap::Parser + AsRef<CommonArgs>,
    S: Settings,
{
    use std::io::Write;
    let matches = A::command().get_matches();
    let args = A::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let common = args.as_ref();
    let name = A::command().get_name().to_string();
    let result = load::<S>(&matches, common).and_then(|settings| {
        if common.print_config {
            let text = to_toml(&settings)?;
            let mut stdout = std::io::stdout();
            // Flushed here: process::exit runs no destructors.
            stdout
                .write_all(text.as_bytes())
                .and_then(|()| stdout.flush())
                .map_err(|e| SettingsError::Other(format!("print the settings: {e}")))?;
            std::process::exit(0);
        }
        Ok(settings)
    });
    result.unwrap_or_else(|e| {
        // Not eprintln!: with stderr gone that would panic instead of exiting.
        let _ = writeln!(std::io::stderr(), "{name}: {e}");
        std::process::exit(2);
    })
}

/// Reads the settings of `S`: its defaults, then the file named by `common.config`, then
/// what clap found in the environment, then what it found on the command line. `matches`
/// are the binary's parsed arguments, whose ids are the settings' keys.
pub fn load<S: Settings>(
    matches: &clap::ArgMatches,
    common: &CommonArgs,
) -> Result<S, SettingsError> {
    let known = keys::<S>()?;
    let mut builder = Config::builder();
    if let Some(path) = &common.config {
        builder = builder.add_source(MapSource(read_file(path, &known)?));
    }
    let (env, flags) = from_clap(matches, &known);
    let merged = builder
        .add_source(MapSource(env))
        .add_source(MapSource(flags))
        .build()
        .map_err(|e| SettingsError::Other(e.to_string()))?;
    let settings = match merged.clone().try_deserialize::<S>() {
        Ok(settings) => settings,
        Err(e) => return Err(blame::<S>(&merged, e)),
    };
    if let Err(invalid) = settings.validate() {
        let value = merged
            .collect()
            .ok()
            .and_then(|values| values.get(invalid.key).cloned())
            .map_or((echo_missing(), "the defaults".to_string()), |v| {
                (echo(&v), origin(&v))
            });
        return Err(SettingsError::Value {
            key: invalid.key.to_string(),
            value: value.0,
            origin: value.1,
            reason: invalid.reason,
        });
    }
    Ok(settings)
}

/// The effective settings as TOML, one `key = value` line each (sorted), secrets
/// redacted by their types; a key without a value is a comment. The output is itself a
/// valid settings file.
pub fn to_toml<S: Settings>(settings: &S) -> Result<String, SettingsError> {
    let value = serde_json::to_value(settings).map_err(|e| SettingsError::Other(e.to_string()))?;
    let serde_json::Value::Object(map) = value else {
        return Err(SettingsError::Other("settings are not a table".into()));
    };
    let mut out = String::new();
    for (key, value) in map.into_iter().collect::<BTreeMap<_, _>>() {
        match value {
            serde_json::Value::Null => out.push_str(&format!("# {key} is not set\n")),
            // A JSON string, number or boolean literal is also a valid TOML one.
            scalar => out.push_str(&format!("{key} = {scalar}\n")),
        }
    }
    Ok(out)
}

/// Every key of `S`, as its default serializes (sorted).
pub fn keys<S: Settings>() -> Result<Vec<String>, SettingsError> {
    match serde_json::to_value(S::default()) {
        Ok(serde_json::Value::Object(map)) => Ok(map.keys().cloned().collect()),
        Ok(_) => Err(SettingsError::Other("settings are not a table".into())),
        Err(e) => Err(SettingsError::Other(e.to_string())),
    }
}

/// Settings whose environment variable is a standard one of another project rather than
/// `HERALD_…`, so the environment an operator already sets for it works here too.
pub const STANDARD_ENV: &[(&str, &str)] = &[("otlp_endpoint", "OTEL_EXPORTER_OTLP_ENDPOINT")];

/// The environment variable of `key`.
pub fn env_var(key: &str) -> String {
    match STANDARD_ENV.iter().find(|(k, _)| *k == key) {
        Some((_, env)) => (*env).to_string(),
        None => format!("{ENV_PREFIX}{}", key.to_ascii_uppercase()),
    }
}

/// The long flag of `key`.
pub fn flag(key: &str) -> String {
    format!("--{}", key.replace('_', "-"))
}

/// Checks that every key of `S` has a flag `--key-name` with env `HERALD_KEY_NAME` and a
/// description that states its default in `command`, so a setting has one name
/// everywhere and `--help` tells the truth. For each binary's unit tests.
pub fn check_flags<S: Settings>(command: &clap::Command) -> Result<(), String> {
    let mut problems = Vec::new();
    let defaults = match serde_json::to_value(S::default()) {
        Ok(serde_json::Value::Object(map)) => map,
        _ => return Err("the defaults are not a table".into()),
    };
    for key in keys::<S>().map_err(|e| e.to_string())? {
        let Some(arg) = command.get_arguments().find(|a| a.get_id() == key.as_str()) else {
            problems.push(format!("`{key}` has no flag"));
            continue;
        };
        let long = arg.get_long().map(|l| format!("--{l}"));
        if long.as_deref() != Some(flag(&key).as_str()) {
            problems.push(format!("`{key}`'s flag is {long:?}, not {}", flag(&key)));
        }
        let env = arg.get_env().map(|e| e.to_string_lossy().into_owned());
        if env.as_deref() != Some(env_var(&key).as_str()) {
            problems.push(format!("`{key}`'s env is {env:?}, not {}", env_var(&key)));
        }
        let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
        if help.is_empty() {
            problems.push(format!("`{key}`'s flag has no description"));
        }
        match defaults.get(&key) {
            Some(serde_json::Value::Null) | None => {}
            // A required key (no usable default).
            Some(serde_json::Value::String(s)) if s.is_empty() => {}
            Some(value) => {
                let shown = value
                    .as_str()
                    .map_or_else(|| value.to_string(), str::to_string);
                if !help.contains(&format!("[default: {shown}]")) {
                    problems.push(format!("`{key}`'s description lacks [default: {shown}]"));
                }
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

/// Both checks a binary's settings need, [`check_flags`] and [`check_readme`], for its one
/// unit test: every setting has a flag and an env of its name, and a README row.
pub fn check_binary<S: Settings>(
    command: &clap::Command,
    readme: &str,
    binary: &str,
) -> Result<(), String> {
    let problems: Vec<String> = [check_flags::<S>(command), check_readme::<S>(readme, binary)]
        .into_iter()
        .filter_map(Result::err)
        .collect();
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("\n"))
    }
}

/// Checks that `readme`'s settings table has a row `` | `key` | … `` for every key of
/// `S`, naming `binary` in its second cell, so docs and code cannot drift. For each
/// binary's unit tests.
pub fn check_readme<S: Settings>(readme: &str, binary: &str) -> Result<(), String> {
    let mut missing = Vec::new();
    for key in keys::<S>().map_err(|e| e.to_string())? {
        let row = format!("| `{key}` |");
        let documented = readme
            .lines()
            .filter(|line| line.starts_with(&row))
            .any(|line| {
                line.split('|')
                    .nth(2)
                    .is_some_and(|binaries| binaries.contains(binary))
            });
        if !documented {
            missing.push(key);
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "README.md's settings table has no row for {binary}'s key(s) {}",
            missing.join(", ")
        ))
    }
}

/// Reads and parses the file; a key `S` does not know is an error, so a misspelt key is
/// never ignored.
fn read_file(path: &Path, known: &[String]) -> Result<HashMap<String, Value>, SettingsError> {
    let (format, name) = match path.extension().and_then(|e| e.to_str()) {
        Some("toml") => (FileFormat::Toml, "TOML"),
        Some("yaml" | "yml") => (FileFormat::Yaml, "YAML"),
        _ => {
            return Err(SettingsError::Read {
                path: path.to_path_buf(),
                reason: "the name must end in .toml, .yaml or .yml".into(),
            });
        }
    };
    let text = std::fs::read_to_string(path).map_err(|e| SettingsError::Read {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let uri = path.display().to_string();
    let map = format
        .parse(Some(&uri), &text)
        .map_err(|e| SettingsError::Parse {
            path: path.to_path_buf(),
            format: name,
            reason: cut_to(
                &e.to_string().replace(&format!(" in {uri}"), ""),
                MAX_PARSE_ERROR_CHARS,
            ),
        })?;
    let mut unknown: Vec<_> = map.keys().filter(|k| !known.contains(k)).collect();
    unknown.sort();
    if let Some(key) = unknown.first() {
        return Err(SettingsError::UnknownKey {
            path: path.to_path_buf(),
            key: cut(key),
            value: map.get(*key).map(echo).unwrap_or_default(),
            known: known.join(", "),
        });
    }
    Ok(map)
}

/// Splits what clap read into the environment layer and the flag layer.
fn from_clap(
    matches: &clap::ArgMatches,
    known: &[String],
) -> (HashMap<String, Value>, HashMap<String, Value>) {
    let mut env = HashMap::new();
    let mut flags = HashMap::new();
    for key in known {
        // A flag given more than once (one that appends) is its values comma-separated.
        let Ok(Some(values)) = matches.try_get_many::<String>(key) else {
            continue;
        };
        let value = values.map(String::as_str).collect::<Vec<_>>().join(",");
        match matches.value_source(key) {
            Some(clap::parser::ValueSource::EnvVariable) => {
                let origin = format!("environment variable {}", env_var(key));
                env.insert(key.clone(), Value::new(Some(&origin), value.as_str()));
            }
            Some(clap::parser::ValueSource::CommandLine) => {
                let origin = format!("flag {}", flag(key));
                flags.insert(key.clone(), Value::new(Some(&origin), value.as_str()));
            }
            _ => {}
        }
    }
    (env, flags)
}

/// Finds the key whose value made deserialization fail: each key alone over the defaults,
/// so the error names the key, its value and its origin whatever `config` put in its
/// message.
fn blame<S: Settings>(merged: &Config, error: ConfigError) -> SettingsError {
    let Ok(values) = merged.collect() else {
        return SettingsError::Other(error.to_string());
    };
    let mut keys: Vec<_> = values.keys().collect();
    keys.sort();
    for key in keys {
        let value = &values[key];
        let alone = Config::builder()
            .add_source(MapSource(HashMap::from([(key.clone(), value.clone())])))
            .build()
            .and_then(Config::try_deserialize::<S>);
        if let Err(e) = alone {
            return SettingsError::Value {
                key: key.clone(),
                value: echo(value),
                origin: origin(value),
                reason: reason(&e),
            };
        }
    }
    SettingsError::Other(error.to_string())
}

/// `config`'s message without the key and origin it appends (the caller names those).
fn reason(error: &ConfigError) -> String {
    match error {
        ConfigError::Type {
            unexpected,
            expected,
            ..
        } => format!("expected {expected}, found {unexpected}"),
        ConfigError::At { error, .. } => reason(error),
        other => other.to_string(),
    }
}

fn origin(value: &Value) -> String {
    value.origin().unwrap_or("the defaults").to_string()
}

/// A value for an error message: strings quoted, cut when long, URL passwords redacted.
fn echo(value: &Value) -> String {
    match &value.kind {
        ValueKind::String(s) => format!("{:?}", cut(&redact_url(s))),
        ValueKind::Table(_) => "(a table)".into(),
        ValueKind::Array(_) => "(a list)".into(),
        ValueKind::Nil => "(empty)".into(),
        other => cut(&other.to_string()),
    }
}

fn echo_missing() -> String {
    "(not set)".into()
}

/// At most [`MAX_ECHO_CHARS`] characters of `s`, saying how long it was when cut.
fn cut(s: &str) -> String {
    cut_to(s, MAX_ECHO_CHARS)
}

fn cut_to(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        None => s.to_string(),
        Some((end, _)) => format!("{}… ({} bytes)", &s[..end], s.len()),
    }
}

/// A layer of values that already carry their origin.
#[derive(Debug, Clone)]
struct MapSource(HashMap<String, Value>);

impl Source for MapSource {
    fn clone_into_box(&self) -> Box<dyn Source + Send + Sync> {
        Box::new(self.clone())
    }

    fn collect(&self) -> Result<HashMap<String, Value>, ConfigError> {
        Ok(self.0.clone())
    }
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}`: {}", self.key, self.reason)
    }
}
