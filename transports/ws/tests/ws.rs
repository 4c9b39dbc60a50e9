//! The WebSocket transport over real sockets: plaintext on loopback, TLS end to end with a
//! generated certificate, the plaintext refusal off loopback, close reasons, limits.
#![allow(clippy::unwrap_used)] // Test helpers fail loudly: that is how a test reports.

use std::time::Duration;

use bytes::Bytes;
use syncra_core::error::TransportError;
use syncra_core::transport::{CloseReason, Connection, Transport};
use syncra_core::wire::ErrorCode;
use syncra_transport_ws::{TlsFiles, WsConfig, WsTransport};

const DEADLINE: Duration = Duration::from_secs(10);

async fn pair(
    server: &WsTransport,
    client: &WsTransport,
    url_host: &str,
) -> (Connection, Connection) {
    let mut listener = server.bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().port();
    let scheme = if listener.url().starts_with("wss") {
        "wss"
    } else {
        "ws"
    };
    let url = format!("{scheme}://{url_host}:{port}/");
    let accept = tokio::spawn(async move {
        let incoming = listener.accept().await.unwrap();
        incoming.handshake.await
    });
    let client_conn = tokio::time::timeout(DEADLINE, client.connect(&url))
        .await
        .unwrap()
        .unwrap();
    let server_conn = tokio::time::timeout(DEADLINE, accept)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    (server_conn, client_conn)
}

async fn exchange(mut a: Connection, mut b: Connection) {
    a.sink
        .send(&[Bytes::from_static(b"one"), Bytes::from_static(b"two")])
        .await
        .unwrap();
    assert_eq!(b.stream.recv().await.unwrap().unwrap(), "one");
    assert_eq!(b.stream.recv().await.unwrap().unwrap(), "two");
    b.sink.send(&[Bytes::from_static(b"back")]).await.unwrap();
    assert_eq!(a.stream.recv().await.unwrap().unwrap(), "back");
    a.sink
        .close(CloseReason::error(ErrorCode::RateLimited, "slow down"))
        .await
        .unwrap();
    assert!(b.stream.recv().await.is_none());
    let reason = b.stream.close_reason().unwrap();
    assert_eq!(reason.code, Some(ErrorCode::RateLimited));
    assert_eq!(reason.message, "slow down");
}

#[tokio::test]
async fn plaintext_on_loopback_exchanges_frames_and_close_reasons() {
    let t = WsTransport::new(WsConfig::default()).unwrap();
    let (server, client) = pair(&t, &t, "127.0.0.1").await;
    assert!(server.peer.addr.ip().is_loopback());
    exchange(server, client).await;
}

#[tokio::test]
async fn plaintext_off_loopback_is_refused_unless_behind_a_proxy() {
    let t = WsTransport::new(WsConfig::default()).unwrap();
    let err = t.bind("0.0.0.0:0").await.err().expect("must refuse");
    assert!(matches!(err, TransportError::Config(_)));
    assert!(err.to_string().contains("behind_tls_proxy"), "{err}");

    let proxied = WsTransport::new(WsConfig {
        behind_tls_proxy: true,
        ..WsConfig::default()
    })
    .unwrap();
    assert!(proxied.bind("0.0.0.0:0").await.is_ok());
}

struct Certs {
    _dir: tempfile::TempDir,
    files: TlsFiles,
    ca: std::path::PathBuf,
}

fn generate_certs() -> Certs {
    let dir = tempfile::tempdir().unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let cert_path = dir.path().join("relay.crt");
    let key_path = dir.path().join("relay.key");
    let ca_path = dir.path().join("ca.crt");
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    std::fs::write(&ca_path, ca_cert.pem()).unwrap();
    Certs {
        _dir: dir,
        files: TlsFiles {
            cert: cert_path,
            key: key_path,
        },
        ca: ca_path,
    }
}

#[tokio::test]
async fn tls_end_to_end_with_a_pinned_ca() {
    let certs = generate_certs();
    let server = WsTransport::new(WsConfig {
        tls: Some(certs.files.clone()),
        ..WsConfig::default()
    })
    .unwrap();
    let client = WsTransport::new(WsConfig {
        ca_file: Some(certs.ca.clone()),
        ..WsConfig::default()
    })
    .unwrap();
    let (s, c) = pair(&server, &client, "localhost").await;
    exchange(s, c).await;
}

#[tokio::test]
async fn tls_client_refuses_a_certificate_it_cannot_verify() {
    let certs = generate_certs();
    let other = generate_certs();
    let server = WsTransport::new(WsConfig {
        tls: Some(certs.files.clone()),
        ..WsConfig::default()
    })
    .unwrap();
    // The client trusts a different CA.
    let client = WsTransport::new(WsConfig {
        ca_file: Some(other.ca.clone()),
        ..WsConfig::default()
    })
    .unwrap();
    let mut listener = server.bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().port();
    tokio::spawn(async move {
        if let Ok(incoming) = listener.accept().await {
            let _ = incoming.handshake.await;
        }
    });
    let err = client
        .connect(&format!("wss://localhost:{port}/"))
        .await
        .expect_err("must refuse");
    assert!(matches!(err, TransportError::Handshake { .. }), "{err}");
}

#[tokio::test]
async fn bad_tls_files_fail_at_start_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.crt");
    let err = WsTransport::new(WsConfig {
        tls: Some(TlsFiles {
            cert: missing.clone(),
            key: missing,
        }),
        ..WsConfig::default()
    })
    .expect_err("must fail");
    assert!(err.to_string().contains("missing.crt"), "{err}");
}

#[tokio::test]
async fn oversized_frames_are_refused_by_the_receiver() {
    let small = WsTransport::new(WsConfig {
        max_frame: 1024,
        ..WsConfig::default()
    })
    .unwrap();
    let big = WsTransport::new(WsConfig::default()).unwrap();
    let (mut server, mut client) = pair(&small, &big, "127.0.0.1").await;
    client
        .sink
        .send(&[Bytes::from(vec![0u8; 4096])])
        .await
        .unwrap();
    let got = server.stream.recv().await;
    assert!(
        matches!(got, Some(Err(TransportError::TooLarge { max: 1024, .. }))),
        "{got:?}"
    );
}

#[tokio::test]
async fn bad_urls_are_clear_errors() {
    let t = WsTransport::new(WsConfig::default()).unwrap();
    for url in ["http://127.0.0.1:1/", "not a url", "ftp://x/"] {
        let err = t.connect(url).await.expect_err("must fail");
        assert!(matches!(err, TransportError::Config(_)), "{url}: {err}");
    }
}
