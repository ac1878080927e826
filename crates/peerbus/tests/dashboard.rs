//! The dashboard in a real browser: `peerbus up`, headless Chromium, a publish through the
//! page. Needs Debian's `chromium` (`.ci/run` installs it; `PEERBUS_CHROMIUM` overrides the
//! path). `PEERBUS_SCREENSHOT=docs/dashboard.png` also saves a screenshot there.

use std::ffi::OsStr;
use std::time::{Duration, Instant};

mod common;

use common::{Up, peerbus};
use headless_chrome::protocol::cdp::Page::CaptureScreenshotFormatOption;
use headless_chrome::{Browser, LaunchOptions, Tab};

fn text(tab: &Tab, js: &str) -> String {
    tab.evaluate(js, false)
        .ok()
        .and_then(|r| r.value)
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

fn wait_text(tab: &Tab, what: &str, js: &str, ok: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let t = text(tab, js);
        if ok(&t) {
            return t;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; last saw {t:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn dashboard_shows_the_cluster_and_publishes_through_the_page() {
    let up = Up::start(3);
    let ix = up.index.clone();
    let dashboard = up
        .banner
        .lines()
        .find_map(|l| l.split("dashboard ").nth(1))
        .map(|u| u.trim().to_string());
    let url = dashboard.expect("up prints the dashboard URL");
    let cli = |args: &[&str]| {
        let out = peerbus()
            .arg("--index")
            .arg(&ix)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    cli(&["topic", "create", "news", "--peer", "peer2"]);
    cli(&["publish", "news", "from the cli"]);

    let chromium = std::env::var("PEERBUS_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    let options = LaunchOptions::default_builder()
        .path(Some(chromium.into()))
        .headless(true)
        .sandbox(false)
        .window_size(Some((1280, 900)))
        .args(
            [
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ]
            .iter()
            .map(OsStr::new)
            .collect(),
        )
        .build()
        .unwrap();
    let browser =
        Browser::new(options).expect("headless Chromium starts (apt-get install chromium)");
    let tab = browser.new_tab().unwrap();
    tab.navigate_to(&url)
        .unwrap()
        .wait_until_navigated()
        .unwrap();

    let peers = wait_text(
        &tab,
        "three active peers",
        "document.querySelector('#peers tbody').innerText",
        |t| t.matches("active").count() - t.matches("inactive").count() == 3,
    );
    for p in ["peer1", "peer2", "peer3"] {
        assert!(peers.contains(p), "{peers}");
    }
    let count = "(document.querySelector('td.count[data-topic=\"news\"]') || {}).textContent || ''";
    wait_text(&tab, "the topic with 1 message", count, |t| t == "1");
    let topics = text(&tab, "document.querySelector('#topics tbody').innerText");
    assert!(
        topics.contains("news") && topics.contains("peer2"),
        "{topics}"
    );

    // Publish through the page.
    tab.find_element("#pub-topic").unwrap().click().unwrap();
    tab.type_str("news").unwrap();
    tab.find_element("#pub-message").unwrap().click().unwrap();
    tab.type_str("from the browser").unwrap();
    tab.find_element("#pub-send").unwrap().click().unwrap();
    wait_text(
        &tab,
        "the publish acknowledgement",
        "document.querySelector('#pub-result').textContent",
        |t| t == "stored at offset 1",
    );
    wait_text(&tab, "the message count to change", count, |t| t == "2");

    // Pull through the page.
    tab.find_element("#pull-topic").unwrap().click().unwrap();
    tab.type_str("news").unwrap();
    tab.find_element("#pull-send").unwrap().click().unwrap();
    let pulled = wait_text(
        &tab,
        "pulled messages",
        "document.querySelector('#pull-result').textContent",
        |t| t.contains("from the browser"),
    );
    assert!(pulled.contains("from the cli"), "{pulled}");

    let png = tab
        .capture_screenshot(CaptureScreenshotFormatOption::Png, None, None, true)
        .unwrap();
    assert!(png.starts_with(b"\x89PNG"));
    if let Ok(path) = std::env::var("PEERBUS_SCREENSHOT") {
        std::fs::write(path, &png).unwrap();
    }

    let rest = up.stop();
    assert_eq!(rest.last().map(String::as_str), Some("stopped"), "{rest:?}");
}
