//! A Salesforce you can run: the REST subset portals-crm uses, an org model with field-level
//! security, the BookMe version guard, daily API quota, and faults on demand.
//!
//! `portals-crm emulator` serves it on a port; [`start`] runs it in-process for `demo`, the
//! bench and the tests, always over real HTTP.

pub mod engine;
pub mod faults;
pub mod org;
pub mod server;
pub mod soql;
pub mod store;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

pub use faults::FaultSpec;
pub use org::OrgSpec;

/// A running emulator.
pub struct EmulatorHandle {
    /// The bound address (useful with port 0).
    pub addr: SocketAddr,
    /// `http://addr` (or `https://` with TLS), the login and instance URL clients use.
    pub base_url: String,
    /// With TLS: the self-signed certificate (PEM) clients must trust.
    pub certificate: Option<PathBuf>,
    cancel: CancellationToken,
    tls: Option<axum_server::Handle<SocketAddr>>,
    task: tokio::task::JoinHandle<()>,
}

impl EmulatorHandle {
    /// Stops serving and waits for the server task to end.
    pub async fn stop(self) {
        self.cancel.cancel();
        if let Some(handle) = &self.tls {
            handle.shutdown();
        }
        let _ = self.task.await;
    }
}

/// Binds `listen` and serves the emulator over https with a self-signed certificate for
/// `localhost` and `127.0.0.1`, written (with its key) into `dir`; real Salesforce client
/// libraries only speak https.
pub async fn start_tls(
    listen: SocketAddr,
    org: OrgSpec,
    faults: &FaultSpec,
    dir: &Path,
) -> std::io::Result<EmulatorHandle> {
    let invalid = |e: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, e);
    let shared = Arc::new(server::Shared::new(org, true));
    shared.apply_faults(faults).map_err(invalid)?;
    let certified =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .map_err(|e| invalid(e.to_string()))?;
    std::fs::create_dir_all(dir)?;
    let certificate = dir.join("emulator-cert.pem");
    let key = dir.join("emulator-key.pem");
    std::fs::write(&certificate, certified.cert.pem())?;
    std::fs::write(&key, certified.signing_key.serialize_pem())?;
    let config = axum_server::tls_rustls::RustlsConfig::from_pem(
        certified.cert.pem().into_bytes(),
        certified.signing_key.serialize_pem().into_bytes(),
    )
    .await?;
    let listener = std::net::TcpListener::bind(listen)?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let handle = axum_server::Handle::new();
    let server = axum_server::from_tcp_rustls(listener, config)?.handle(handle.clone());
    let app = server::router(shared);
    let task = tokio::spawn(async move {
        // The peer address is the caller's IP for the Login IP Ranges check.
        if let Err(error) = server
            .serve(app.into_make_service_with_connect_info::<SocketAddr>())
            .await
        {
            tracing::error!(%error, "emulator server stopped");
        }
    });
    Ok(EmulatorHandle {
        addr,
        base_url: format!("https://{addr}"),
        certificate: Some(certificate),
        cancel: CancellationToken::new(),
        tls: Some(handle),
        task,
    })
}

/// Binds `listen` and serves the emulator over `org` until stopped.
pub async fn start(
    listen: SocketAddr,
    org: OrgSpec,
    faults: &FaultSpec,
) -> std::io::Result<EmulatorHandle> {
    let shared = Arc::new(server::Shared::new(org, false));
    shared
        .apply_faults(faults)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let cancel = CancellationToken::new();
    let app = server::router(shared);
    let stop = cancel.clone();
    let task = tokio::spawn(async move {
        let served = axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(stop.cancelled_owned())
        .await;
        if let Err(error) = served {
            tracing::error!(%error, "emulator server stopped");
        }
    });
    Ok(EmulatorHandle {
        addr,
        base_url: format!("http://{addr}"),
        certificate: None,
        cancel,
        tls: None,
        task,
    })
}
