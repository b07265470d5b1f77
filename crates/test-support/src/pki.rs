//! A throwaway certificate authority for mutual-TLS tests: certificates generated at test
//! time with rcgen, written as the PEM files Herald's binaries read.

#![allow(clippy::unwrap_used)]

use std::net::IpAddr;
use std::path::Path;

use herald_tls::TlsFiles;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};

/// A CA that issues certificates for tests.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl TestCa {
    pub fn new(name: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).unwrap();
        TestCa {
            issuer: Issuer::new(params, key),
            pem: cert.pem(),
        }
    }

    pub fn ca_pem(&self) -> &str {
        &self.pem
    }

    /// A certificate and key (PEM) for `sans`: `spiffe://…` and other `scheme://` names are
    /// URI SANs, addresses are IP SANs, the rest DNS SANs.
    pub fn issue(&self, sans: &[&str]) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(
            DnType::CommonName,
            sans.first().copied().unwrap_or("herald"),
        );
        params.subject_alt_names = sans
            .iter()
            .map(|s| {
                if s.contains("://") {
                    SanType::URI((*s).try_into().unwrap())
                } else if let Ok(ip) = s.parse::<IpAddr>() {
                    SanType::IpAddress(ip)
                } else {
                    SanType::DnsName((*s).try_into().unwrap())
                }
            })
            .collect();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// Issues a certificate for `sans` and writes `<name>.crt`, `<name>.key` and
    /// `<name>-ca.crt` (this CA) into `dir`.
    pub fn write(&self, dir: &Path, name: &str, sans: &[&str]) -> TlsFiles {
        let (cert, key) = self.issue(sans);
        let files = TlsFiles {
            cert: dir.join(format!("{name}.crt")),
            key: dir.join(format!("{name}.key")),
            ca: dir.join(format!("{name}-ca.crt")),
        };
        std::fs::write(&files.cert, cert).unwrap();
        std::fs::write(&files.key, key).unwrap();
        std::fs::write(&files.ca, &self.pem).unwrap();
        files
    }
}
