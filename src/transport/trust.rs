//! Trust by pinned certificates, and the rustls verifiers that enforce it.
//!
//! A [`TrustStore`] is the set of peer certificates a site accepts (each
//! `--trust PEER.crt`). There are no certificate authorities, chains, names
//! or expiry checks: a peer is accepted if and only if
//! 1. its end-entity certificate is byte-for-byte one of the trusted ones
//!    (compared by SHA-256 [`Fingerprint`] of the DER), and
//! 2. its TLS 1.3 `CertificateVerify` signature verifies with that
//!    certificate's public key (so it holds the private key).
//!
//! [`PinnedServerVerifier`] (used by the client) and [`PinnedClientVerifier`]
//! (used by the server, client authentication mandatory) implement that.
//! They read a [`SharedTrust`]: whoever holds it may swap the set of trusted
//! certificates while the endpoint runs (a configuration reload), and
//! the next handshake uses the new set.
//! TLS 1.2 signatures are always refused (the configurations are TLS 1.3
//! only anyway). A refusal is a rustls `Error::Other` wrapping [`NotTrusted`],
//! whose text names the fingerprint and CN; quinn carries that text in the
//! QUIC CONNECTION_CLOSE reason, so the refused peer sees it too.

use super::keys::{load_cert, subject_cn, Fingerprint};
use super::TransportError;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

/// One trusted peer certificate.
#[derive(Debug, Clone)]
pub struct TrustedPeer {
    pub fingerprint: Fingerprint,
    /// Subject CN (escaped for printing), empty if none.
    pub cn: String,
    pub cert: CertificateDer<'static>,
}

/// The set of pinned peer certificates.
#[derive(Debug, Clone, Default)]
pub struct TrustStore {
    peers: BTreeMap<Fingerprint, TrustedPeer>,
}

impl TrustStore {
    /// An empty store: trusts nobody.
    pub fn new() -> Self {
        Self::default()
    }

    /// Trust the certificates in these PEM files (one certificate each, as
    /// written by `vdrep keys init`).
    pub fn from_files<P: AsRef<Path>>(paths: &[P]) -> Result<Self, TransportError> {
        let mut t = Self::new();
        for p in paths {
            t.add_file(p.as_ref())?;
        }
        Ok(t)
    }

    /// Trust the certificate in a PEM file.
    pub fn add_file(&mut self, path: &Path) -> Result<Fingerprint, TransportError> {
        let cert = load_cert(path)?;
        Ok(self.add(cert))
    }

    /// Trust a DER certificate; returns its fingerprint.
    pub fn add(&mut self, cert: CertificateDer<'static>) -> Fingerprint {
        let fingerprint = Fingerprint::of_der(&cert);
        let cn = subject_cn(&cert).unwrap_or_default();
        self.peers.insert(
            fingerprint,
            TrustedPeer {
                fingerprint,
                cn,
                cert,
            },
        );
        fingerprint
    }

    /// Is this DER certificate trusted?
    pub fn get(&self, cert: &[u8]) -> Option<&TrustedPeer> {
        let fp = Fingerprint::of_der(cert);
        self.peers.get(&fp).filter(|p| p.cert.as_ref() == cert)
    }

    /// The trusted peers, by fingerprint.
    pub fn peers(&self) -> impl Iterator<Item = &TrustedPeer> {
        self.peers.values()
    }

    pub fn len(&self) -> usize {
        self.peers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }
}

/// Why a peer certificate was refused: it is not one of the pinned ones.
#[derive(Debug, thiserror::Error)]
#[error("certificate {fingerprint} (CN={cn}) is not trusted")]
pub struct NotTrusted {
    pub fingerprint: Fingerprint,
    pub cn: String,
}

/// The pin is on the end-entity certificate alone: any other certificates
/// the peer sends are ignored (they cannot make an unpinned one trusted).
fn check_pinned(trust: &TrustStore, end_entity: &CertificateDer<'_>) -> Result<(), rustls::Error> {
    if trust.get(end_entity).is_some() {
        return Ok(());
    }
    let fingerprint = Fingerprint::of_der(end_entity);
    let cn = subject_cn(end_entity).unwrap_or_else(|| "?".into());
    Err(rustls::Error::Other(rustls::OtherError(Arc::new(
        NotTrusted { fingerprint, cn },
    ))))
}

fn algorithms() -> WebPkiSupportedAlgorithms {
    super::provider().signature_verification_algorithms
}

fn verify13(
    trust: &TrustStore,
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    // The signature is checked against the presented certificate, which the
    // verify_*_cert step already matched against the pins; check again so
    // this method is safe on its own.
    check_pinned(trust, cert)?;
    rustls::crypto::verify_tls13_signature(message, cert, dss, &algorithms()).map_err(|e| {
        rustls::Error::Other(rustls::OtherError(Arc::new(NoProof {
            fingerprint: Fingerprint::of_der(cert),
            cn: subject_cn(cert).unwrap_or_else(|| "?".into()),
            why: e.to_string(),
        })))
    })
}

/// Why a pinned certificate was refused anyway: the peer's handshake
/// signature does not verify with it (a copied certificate without its key,
/// or a key file that does not match).
#[derive(Debug, thiserror::Error)]
#[error(
    "certificate {fingerprint} (CN={cn}) is trusted, but the peer did not prove it holds \
     its private key (handshake signature: {why}); an impostor, or a mismatched key file"
)]
pub struct NoProof {
    pub fingerprint: Fingerprint,
    pub cn: String,
    pub why: String,
}

fn refuse_tls12() -> rustls::Error {
    rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls13RequiredForQuic)
}

/// A [`TrustStore`] that can be swapped while verifiers use it (clones
/// share the same store).
#[derive(Debug, Clone, Default)]
pub struct SharedTrust(Arc<parking_lot::RwLock<TrustStore>>);

impl SharedTrust {
    pub fn new(trust: TrustStore) -> Self {
        SharedTrust(Arc::new(parking_lot::RwLock::new(trust)))
    }

    /// Trust `trust` from the next handshake on (connections already
    /// established stay up).
    pub fn replace(&self, trust: TrustStore) {
        *self.0.write() = trust;
    }

    /// The current set.
    pub fn get(&self) -> TrustStore {
        self.0.read().clone()
    }
}

/// Client side: accept the server iff its certificate is pinned.
#[derive(Debug)]
pub struct PinnedServerVerifier {
    trust: SharedTrust,
}

impl PinnedServerVerifier {
    pub fn new(trust: TrustStore) -> Self {
        Self::shared(SharedTrust::new(trust))
    }

    /// A verifier that reads `trust` at each handshake.
    pub fn shared(trust: SharedTrust) -> Self {
        Self { trust }
    }
}

impl ServerCertVerifier for PinnedServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        check_pinned(&self.trust.0.read(), end_entity)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(refuse_tls12())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify13(&self.trust.0.read(), message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algorithms().supported_schemes()
    }
}

/// Server side: client authentication is mandatory; accept the client iff
/// its certificate is pinned.
#[derive(Debug)]
pub struct PinnedClientVerifier {
    trust: SharedTrust,
}

impl PinnedClientVerifier {
    pub fn new(trust: TrustStore) -> Self {
        Self::shared(SharedTrust::new(trust))
    }

    /// A verifier that reads `trust` at each handshake.
    pub fn shared(trust: SharedTrust) -> Self {
        Self { trust }
    }
}

// The same methods as the server verifier's: rustls's two verifier traits
// declare them separately; both bodies delegate to `check_pinned`/`verify13`.
impl ClientCertVerifier for PinnedClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        check_pinned(&self.trust.0.read(), end_entity)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(refuse_tls12())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify13(&self.trust.0.read(), message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algorithms().supported_schemes()
    }
}
