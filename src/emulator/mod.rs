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
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

pub use faults::FaultSpec;
pub use org::OrgSpec;

/// A running emulator.
pub struct EmulatorHandle {
    /// The bound address (useful with port 0).
    pub addr: SocketAddr,
    /// `http://addr`, the login and instance URL clients use.
    pub base_url: String,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl EmulatorHandle {
    /// Stops serving and waits for the server task to end.
    pub async fn stop(self) {
        self.cancel.cancel();
        let _ = self.task.await;
    }
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
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await;
        if let Err(error) = served {
            tracing::error!(%error, "emulator server stopped");
        }
    });
    Ok(EmulatorHandle {
        addr,
        base_url: format!("http://{addr}"),
        cancel,
        task,
    })
}
