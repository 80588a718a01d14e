//! A real browser for the console's tests: Debian's `chromium` driven through
//! `chromedriver` (WebDriver), started by the test on a free port with a fresh profile.
//! Nothing is downloaded. In CI (`CI` set) a missing browser fails the test; locally the test
//! says so and skips.

use std::process::Stdio;
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;

/// The browser and its driver; both end when this is dropped (after [`Browser::close`]).
pub struct Browser {
    pub client: Client,
    driver: tokio::process::Child,
    profile: std::path::PathBuf,
}

fn find(candidates: &[&str]) -> Option<std::path::PathBuf> {
    candidates
        .iter()
        .map(std::path::PathBuf::from)
        .find(|p| p.exists())
}

impl Browser {
    /// A headless Chromium at a 1280×900 window, or None (after saying why) when this machine
    /// has none and this is not CI.
    pub async fn start(test: &str) -> Option<Self> {
        let chromium = find(&["/usr/bin/chromium", "/usr/bin/chromium-browser"]);
        let driver = find(&["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]);
        let (Some(chromium), Some(driver)) = (chromium, driver) else {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI: the browser tests need Debian's chromium and chromium-driver (.ci/run installs them)"
            );
            eprintln!(
                "{test}: SKIPPED, no chromium/chromedriver here (apt-get install chromium chromium-driver)"
            );
            return None;
        };
        let profile =
            std::env::temp_dir().join(format!("portals-crm-chromium-{:x}", rand::random::<u64>()));
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "binary": chromium,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    "--no-first-run", "--window-size=1280,900",
                    format!("--user-data-dir={}", profile.display()),
                ],
            }),
        );
        let mut last = String::new();
        // chromedriver takes a port number, not a listener: the free port found here can be
        // taken by another test's listener before chromedriver binds it, and chromedriver then
        // exits. Each such loss gets a new port.
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let mut child = tokio::process::Command::new(&driver)
                .arg(format!("--port={port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .expect("chromedriver starts");
            let url = format!("http://127.0.0.1:{port}");
            for _ in 0..100 {
                if let Ok(Some(status)) = child.try_wait() {
                    last = format!("chromedriver on port {port} exited: {status}");
                    break;
                }
                match ClientBuilder::new(HttpConnector::new())
                    .capabilities(caps.clone())
                    .connect(&url)
                    .await
                {
                    Ok(client) => {
                        return Some(Self {
                            client,
                            driver: child,
                            profile,
                        });
                    }
                    Err(e) => last = e.to_string(),
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        panic!("chromedriver did not accept a session: {last}");
    }

    /// The text of the element `css` selects, waiting for it to appear.
    pub async fn text(&self, css: &str) -> String {
        self.element(css).await.text().await.unwrap()
    }

    /// Waits until the element `css` selects shows text containing `wanted`.
    pub async fn wait_text(&self, css: &str, wanted: &str) -> String {
        let mut seen = String::new();
        for _ in 0..200 {
            if let Ok(element) = self.client.find(Locator::Css(css)).await {
                seen = element.text().await.unwrap_or_default();
                if seen.contains(wanted) {
                    return seen;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let page = self.client.source().await.unwrap_or_default();
        panic!("{css} never showed {wanted:?}; last: {seen:?}; page: {page}");
    }

    /// The element `css` selects, waiting for it to appear.
    async fn element(&self, css: &str) -> fantoccini::elements::Element {
        self.client
            .wait()
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("{css}: {e}"))
    }

    /// Clicks the element `css` selects once it is there.
    pub async fn click(&self, css: &str) {
        let clicked = self.element(css).await.click().await;
        clicked.unwrap_or_else(|e| panic!("{css}: {e}"));
    }

    /// Types `keys` into the element `css` selects.
    pub async fn type_into(&self, css: &str, keys: &str) {
        let typed = self.element(css).await.send_keys(keys).await;
        typed.unwrap_or_else(|e| panic!("{css}: {e}"));
    }

    /// Saves a PNG of the page, for the README.
    pub async fn screenshot(&self, path: &str) {
        let png = self.client.screenshot().await.unwrap();
        std::fs::write(path, png).unwrap();
    }

    /// Ends the session; the driver is killed when dropped.
    pub async fn close(mut self) {
        let _ = self.client.clone().close().await;
        let _ = self.driver.kill().await;
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}
