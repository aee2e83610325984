//! A real headless Chromium for the dashboard's tests, driven through WebDriver: each
//! [`Browser`] starts its own `chromedriver` on a free loopback port (in its own process group,
//! with a home and a temporary directory of its own), opens one session in a light or dark
//! theme at a given viewport size, and tears both down when dropped — the session deleted so
//! that chromedriver quits the browser, then the whole process group killed. The helpers wait
//! on conditions with deadlines and, when one passes, panic with what the page shows.
//!
//! The binaries come from `CAPSTAN_CHROMEDRIVER` and `CAPSTAN_CHROMIUM` (set by
//! `cargo xtask test`, which installs Debian's packages when they are missing), else Debian's
//! places for them. [`Browser::accessibility`] runs axe-core, the script `CAPSTAN_AXE` names
//! (set by `cargo xtask test`, which fetches it from the npm registry), in the page. What is
//! served, and how a page should look, is the tests' business.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use capstan_testkit::http::HttpClient;
use fantoccini::actions::{InputSource, KeyAction, KeyActions};
use fantoccini::elements::Element;
use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::{Value, json};

/// The keys [`Browser::press`] takes.
pub use fantoccini::key::Key;

/// A wide desktop viewport, in CSS pixels.
pub const WIDE: (u32, u32) = (1280, 900);

/// A phone's viewport, in CSS pixels.
pub const NARROW: (u32, u32) = (375, 800);

/// How long the helpers without a deadline of their own wait.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// How long chromedriver may take to answer `/status` as ready.
const DRIVER_START: Duration = Duration::from_secs(30);

/// How long deleting the session (chromedriver quitting the browser) may take on drop.
const SESSION_CLOSE: Duration = Duration::from_secs(15);

/// How often a page is probed while waiting: each probe is a WebDriver round trip or two.
const PROBE_INTERVAL: Duration = Duration::from_millis(100);

/// The colour scheme the browser reports to pages (`prefers-color-scheme`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Theme {
    /// `prefers-color-scheme: light`.
    Light,
    /// `prefers-color-scheme: dark`.
    Dark,
}

impl Theme {
    /// `light` or `dark`, as screenshots are named.
    pub fn name(self) -> &'static str {
        match self {
            Theme::Light => "light",
            Theme::Dark => "dark",
        }
    }

    /// The browser's command-line flags for the theme.
    // NOTE: checked on Debian's Chromium 156: `--force-dark-mode` alone, or
    // `--blink-settings=preferredColorScheme=0` alone (0 is Blink's `kDark`), each makes
    // `(prefers-color-scheme: dark)` match; both are given, the first also darkening native
    // controls as a dark desktop does. Light is pinned too (1 is `kLight`), so that a machine
    // set to dark does not turn a light run dark.
    fn flags(self) -> &'static [&'static str] {
        match self {
            Theme::Light => &["--blink-settings=preferredColorScheme=1"],
            Theme::Dark => &[
                "--force-dark-mode",
                "--blink-settings=preferredColorScheme=0",
            ],
        }
    }
}

/// Where chromedriver is: `CAPSTAN_CHROMEDRIVER`, else Debian's place for it.
pub fn chromedriver_path() -> PathBuf {
    std::env::var_os("CAPSTAN_CHROMEDRIVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromedriver"))
}

/// Where Chromium is: `CAPSTAN_CHROMIUM`, else Debian's place for it.
pub fn chromium_path() -> PathBuf {
    std::env::var_os("CAPSTAN_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"))
}

/// The WCAG levels [`Browser::accessibility`] checks, as axe-core tags them: 2.0 and 2.1,
/// levels A and AA.
pub const WCAG_TAGS: [&str; 4] = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa"];

/// How many of a violation's elements [`Browser::accessibility`] names.
const TARGETS_SHOWN: usize = 3;

/// axe-core's script, read once from the file `CAPSTAN_AXE` names. Panics, saying to run the
/// tests with `cargo xtask test`, when the variable is unset or the file cannot be read: the
/// accessibility check is never skipped.
fn axe_script() -> &'static str {
    static SCRIPT: OnceLock<String> = OnceLock::new();
    SCRIPT.get_or_init(|| {
        let path = std::env::var_os("CAPSTAN_AXE").unwrap_or_else(|| {
            panic!(
                "CAPSTAN_AXE is not set: run the tests with `cargo xtask test` (it fetches \
                 axe-core from the npm registry and names its axe.min.js), or point CAPSTAN_AXE \
                 at an axe.min.js"
            )
        });
        let path = PathBuf::from(path);
        std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "CAPSTAN_AXE={} cannot be read ({e}): run the tests with `cargo xtask test`, \
                 which fetches axe-core into its cache",
                path.display()
            )
        })
    })
}

/// Where [`Browser::screenshot`] writes: `target/screenshots/` under the workspace's root.
pub fn screenshots_dir() -> PathBuf {
    capstan_testkit::workspace_root()
        .join("target")
        .join("screenshots")
}

/// A running chromedriver, the leader of its own process group; the group is killed on drop.
struct Driver {
    child: Child,
    port: u16,
    /// HOME and TMPDIR of chromedriver and the browsers it starts: their profiles, caches and
    /// crash reports go here and are removed with it.
    home: tempfile::TempDir,
}

impl Driver {
    /// Starts chromedriver and waits until it says it is ready for sessions.
    async fn start() -> Self {
        let binary = chromedriver_path();
        assert!(
            binary.exists(),
            "{} is missing: run the tests with `cargo xtask test` (it installs Chromium and its \
             driver), or `apt-get install chromium chromium-driver`, or point \
             CAPSTAN_CHROMEDRIVER at a chromedriver",
            binary.display()
        );
        let home = tempfile::Builder::new()
            .prefix("capstan-browser-")
            .tempdir()
            .expect("a directory for the browser's profile");
        let log = std::fs::File::create(home.path().join("chromedriver.log"))
            .expect("the chromedriver log");
        let port = capstan_testkit::server::free_port();
        let child = Command::new(&binary)
            .arg(format!("--port={port}"))
            .env("HOME", home.path())
            .env("TMPDIR", home.path())
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().expect("clone the log handle")))
            .stderr(Stdio::from(log))
            // Its own group: the browsers it starts are killed with it even if it cannot quit
            // them itself (a browser outlives a chromedriver killed with SIGKILL).
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        let mut driver = Self { child, port, home };
        driver.wait_ready().await;
        driver
    }

    /// `http://127.0.0.1:<port>`.
    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    async fn wait_ready(&mut self) {
        let http = HttpClient::new(self.url());
        let deadline = Instant::now() + DRIVER_START;
        loop {
            if let Some(status) = self.child.try_wait().expect("chromedriver's state") {
                panic!(
                    "chromedriver exited before it was ready ({status}):\n{}",
                    self.log()
                );
            }
            let ready = http.try_get("/status").await.ok().is_some_and(|reply| {
                reply.status.is_success() && reply.json()["value"]["ready"] == json!(true)
            });
            if ready {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "chromedriver was not ready within {DRIVER_START:?}:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(PROBE_INTERVAL).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.home.path().join("chromedriver.log")).unwrap_or_default()
    }

    /// Deletes `session` (chromedriver quits its browser), blocking: this runs in `Drop`, where
    /// the runtime that fantoccini's own clean-up would need may already be gone.
    fn delete_session(&self, session: &str) {
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return;
        };
        let _ = stream.set_read_timeout(Some(SESSION_CLOSE));
        let _ = stream.set_write_timeout(Some(SESSION_CLOSE));
        let request = format!(
            "DELETE /session/{session} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\n\
             Connection: close\r\nContent-Length: 0\r\n\r\n",
            self.port
        );
        if stream.write_all(request.as_bytes()).is_ok() {
            // The reply comes once the browser has quit; its content does not matter.
            // NOTE: read to the reply's length, not to the end: chromedriver answers
            // `Connection: close` but keeps the connection open.
            read_reply(&mut stream);
        }
    }
}

/// Reads one HTTP/1.1 reply from `stream`: its head, then as many bytes as its
/// `Content-Length` says (or until the stream ends, fails or times out).
fn read_reply(stream: &mut TcpStream) {
    let mut received = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut expected: Option<usize> = None;
    loop {
        if let Some(total) = expected
            && received.len() >= total
        {
            return;
        }
        let read = match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(read) => read,
        };
        received.extend_from_slice(&chunk[..read]);
        if expected.is_none()
            && let Some(end) = received.windows(4).position(|w| w == b"\r\n\r\n")
        {
            let head = String::from_utf8_lossy(&received[..end]).to_ascii_lowercase();
            let length = head
                .lines()
                .find_map(|line| line.strip_prefix("content-length:"))
                .and_then(|value| value.trim().parse::<usize>().ok())
                .unwrap_or(0);
            expected = Some(end + 4 + length);
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!("==== chromedriver log (tail) ====");
            for line in &lines[lines.len().saturating_sub(40)..] {
                eprintln!("{line}");
            }
        }
        let group = i32::try_from(self.child.id()).map(Pid::from_raw);
        if let Ok(group) = group {
            let _ = killpg(group, Signal::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One browser session: a headless Chromium with its own chromedriver.
pub struct Browser {
    client: Client,
    session: String,
    theme: Theme,
    // Dropped last: the session is deleted first (in `Drop`), then the driver's group killed.
    driver: Driver,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium reporting `theme` to pages, with a viewport
    /// of `size` (CSS pixels, width × height). Panics, saying what to install, when
    /// chromedriver is missing: the dashboard's tests never skip.
    pub async fn open(theme: Theme, size: (u32, u32)) -> Self {
        let driver = Driver::start().await;
        let (width, height) = size;
        let mut args = vec![
            "--headless=new".to_owned(),
            "--no-sandbox".to_owned(),
            "--disable-gpu".to_owned(),
            "--disable-dev-shm-usage".to_owned(),
            format!("--window-size={width},{height}"),
        ];
        args.extend(theme.flags().iter().map(|flag| (*flag).to_owned()));
        let mut capabilities = fantoccini::wd::Capabilities::new();
        capabilities.insert("browserName".into(), json!("chrome"));
        capabilities.insert(
            "goog:chromeOptions".into(),
            json!({"binary": chromium_path(), "args": args}),
        );
        let client = ClientBuilder::new(HttpConnector::new())
            .capabilities(capabilities)
            .connect(&driver.url())
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "chromedriver could not start {}: {e}\n{}",
                    chromium_path().display(),
                    driver.log()
                )
            });
        let session = client
            .session_id()
            .await
            .expect("the session's id")
            .expect("a session was created");
        let browser = Self {
            client,
            session,
            theme,
            driver,
        };
        browser.set_size(size).await;
        browser
    }

    /// The WebDriver client, for what the helpers do not cover.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The theme the browser was opened with.
    pub fn theme(&self) -> Theme {
        self.theme
    }

    /// Sets the viewport to `size` (CSS pixels), for this page and the following ones.
    // NOTE: not the window's size: a headless Chromium's window keeps room for a toolbar and
    // is at least 500 pixels wide, so `--window-size=375,800` gives a 500 × 657 viewport. The
    // DevTools metrics override (through chromedriver's `goog/cdp/execute`) sets the viewport
    // itself, as a desktop browser of that size (`mobile: false`) has it.
    pub async fn set_size(&self, size: (u32, u32)) {
        let (width, height) = size;
        self.cdp(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": false}),
        )
        .await;
    }

    /// Runs a DevTools command in the session's page through chromedriver.
    pub async fn cdp(&self, command: &str, params: Value) -> Value {
        let http = HttpClient::new(self.driver.url());
        let body = json!({"cmd": command, "params": params});
        let reply = http
            .post_json(
                &format!("/session/{}/goog/cdp/execute", self.session),
                &body.to_string(),
            )
            .await;
        assert!(
            reply.status.is_success(),
            "{command} failed: {} {}",
            reply.status,
            reply.text()
        );
        reply.json()["value"].clone()
    }

    /// Opens `url` and waits for it to load.
    pub async fn goto(&self, url: &str) {
        self.client
            .goto(url)
            .await
            .unwrap_or_else(|e| panic!("cannot open {url}: {e}"));
    }

    /// The address of the page shown.
    pub async fn url(&self) -> String {
        self.client
            .current_url()
            .await
            .expect("the current URL")
            .to_string()
    }

    /// Runs `script` (a function body; `arguments` holds `args`) in the page and returns what
    /// it returns.
    pub async fn execute(&self, script: &str, args: Vec<Value>) -> Value {
        self.client
            .execute(script, args)
            .await
            .unwrap_or_else(|e| panic!("the script failed: {e}\n{script}"))
    }

    /// Checks the page shown against WCAG 2.0 and 2.1, levels A and AA ([`WCAG_TAGS`]), with
    /// axe-core (injected unless the page has it already), and returns one line per rule
    /// violated: the rule, its impact, what it asks, the first few elements failing it (as CSS
    /// selectors) and why the first one fails. Empty when the page passes. Panics when
    /// `CAPSTAN_AXE` names no script (see `cargo xtask test`) or axe-core cannot run.
    pub async fn accessibility(&self) -> Vec<String> {
        let loaded = self
            .execute("return typeof window.axe === 'object';", Vec::new())
            .await;
        if loaded != json!(true) {
            self.client
                .execute(axe_script(), Vec::new())
                .await
                .unwrap_or_else(|e| panic!("axe-core could not be injected: {e}"));
        }
        // The last argument of an asynchronous script is the callback that returns its
        // result; axe's own failure is returned too, to be reported with the page.
        let script = r"
            const [tags, done] = arguments;
            axe.run(document, {runOnly: {type: 'tag', values: tags}, resultTypes: ['violations']})
                .then(
                    (results) => done({violations: results.violations.map((rule) => ({
                        id: rule.id,
                        impact: rule.impact,
                        help: rule.help,
                        nodes: rule.nodes.map((node) => ({
                            target: node.target.map((part) => [].concat(part).join(' >>> ')),
                            summary: node.failureSummary,
                        })),
                    }))}),
                    (error) => done({error: String((error && error.stack) || error)}),
                );
        ";
        let result = match self
            .client
            .execute_async(script, vec![json!(WCAG_TAGS)])
            .await
        {
            Ok(result) => result,
            Err(e) => panic!("axe-core could not run: {e}\n{}", self.describe().await),
        };
        if let Some(error) = result.get("error") {
            panic!("axe-core failed: {error}\n{}", self.describe().await);
        }
        let violations = result["violations"]
            .as_array()
            .unwrap_or_else(|| panic!("axe-core returned no violations list: {result}"));
        violations.iter().map(violation_line).collect()
    }

    /// The first element matching `css`, if there is one now.
    pub async fn find(&self, css: &str) -> Option<Element> {
        self.client.find(Locator::Css(css)).await.ok()
    }

    /// Every element matching `css` now.
    pub async fn find_all(&self, css: &str) -> Vec<Element> {
        self.client
            .find_all(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("cannot look for {css}: {e}"))
    }

    /// Whether an element matches `css` now.
    pub async fn exists(&self, css: &str) -> bool {
        !self.find_all(css).await.is_empty()
    }

    /// The rendered text of the first element matching `css` (trimmed), if there is one.
    pub async fn text(&self, css: &str) -> Option<String> {
        let element = self.find(css).await?;
        element.text().await.ok().map(|text| text.trim().to_owned())
    }

    /// Waits until an element matches `css` and returns it; panics, with what the page shows,
    /// when `deadline` passes first.
    pub async fn wait_for(&self, css: &str, deadline: Duration) -> Element {
        let until = Instant::now() + deadline;
        loop {
            if let Some(element) = self.find(css).await {
                return element;
            }
            if Instant::now() >= until {
                panic!(
                    "no element matched {css} within {deadline:?}\n{}",
                    self.describe().await
                );
            }
            tokio::time::sleep(PROBE_INTERVAL).await;
        }
    }

    /// Clicks the first element matching `css`, waiting (up to [`DEADLINE`]) until there is one
    /// that takes the click. A live page replaces parts of itself as they change, so an element
    /// found may be gone by the time it is clicked: it is looked for again then.
    pub async fn click(&self, css: &str) {
        let until = Instant::now() + DEADLINE;
        loop {
            let clicked = match self.find(css).await {
                Some(element) => element.click().await.map_err(|e| e.to_string()),
                None => Err("no element matches".to_owned()),
            };
            match clicked {
                Ok(()) => return,
                Err(error) if Instant::now() >= until => panic!(
                    "cannot click {css} within {DEADLINE:?}: {error}\n{}",
                    self.describe().await
                ),
                Err(_) => tokio::time::sleep(PROBE_INTERVAL).await,
            }
        }
    }

    /// Types `text` into the first element matching `css`, waiting (up to [`DEADLINE`]) for
    /// one; like [`Browser::click`], looks for it again when it was replaced meanwhile.
    pub async fn type_into(&self, css: &str, text: &str) {
        let until = Instant::now() + DEADLINE;
        loop {
            let typed = match self.find(css).await {
                Some(element) => element.send_keys(text).await.map_err(|e| e.to_string()),
                None => Err("no element matches".to_owned()),
            };
            match typed {
                Ok(()) => return,
                Err(error) if Instant::now() >= until => panic!(
                    "cannot type into {css} within {DEADLINE:?}: {error}\n{}",
                    self.describe().await
                ),
                Err(_) => tokio::time::sleep(PROBE_INTERVAL).await,
            }
        }
    }

    /// Presses and releases `key` on the keyboard, on whatever holds the focus (the page
    /// itself when nothing does), as a person would.
    pub async fn press(&self, key: Key) {
        let keys = KeyActions::new("keyboard".to_owned())
            .then(KeyAction::Down { value: key.into() })
            .then(KeyAction::Up { value: key.into() });
        self.client
            .perform_actions(keys)
            .await
            .unwrap_or_else(|e| panic!("cannot press {key:?}: {e}"));
    }

    /// Waits (up to [`DEADLINE`]) until the text of the first element matching `css` satisfies
    /// `predicate`, and returns it.
    pub async fn wait_text(&self, css: &str, predicate: impl Fn(&str) -> bool) -> String {
        self.wait_text_within(css, DEADLINE, predicate).await
    }

    /// Like [`Browser::wait_text`] with a deadline of its own.
    pub async fn wait_text_within(
        &self,
        css: &str,
        deadline: Duration,
        predicate: impl Fn(&str) -> bool,
    ) -> String {
        let until = Instant::now() + deadline;
        loop {
            let text = self.text(css).await;
            if let Some(text) = text.as_deref().filter(|text| predicate(text)) {
                return text.to_owned();
            }
            if Instant::now() >= until {
                panic!(
                    "the text of {css} did not become what was expected within {deadline:?} \
                     (last: {text:?})\n{}",
                    self.describe().await
                );
            }
            tokio::time::sleep(PROBE_INTERVAL).await;
        }
    }

    /// Waits (up to [`DEADLINE`]) until the page's address satisfies `predicate`, and returns
    /// it.
    pub async fn wait_url(&self, predicate: impl Fn(&str) -> bool) -> String {
        let until = Instant::now() + DEADLINE;
        loop {
            let url = self.url().await;
            if predicate(&url) {
                return url;
            }
            if Instant::now() >= until {
                panic!(
                    "the page's address did not become what was expected within {DEADLINE:?}\n{}",
                    self.describe().await
                );
            }
            tokio::time::sleep(PROBE_INTERVAL).await;
        }
    }

    /// Writes what the viewport shows to `target/screenshots/<name>.png` and returns the path.
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        let png = self
            .client
            .screenshot()
            .await
            .unwrap_or_else(|e| panic!("cannot take the screenshot {name}: {e}"));
        let dir = screenshots_dir();
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        path
    }

    /// What the page shows, for failure messages: its address, its `#status` and the start of
    /// its text.
    pub async fn describe(&self) -> String {
        let script = "return [location.href, \
                      (document.querySelector('#status') || {}).innerText || null, \
                      document.body ? document.body.innerText : ''];";
        match self.client.execute(script, Vec::new()).await {
            Ok(Value::Array(parts)) => {
                let text = |index: usize| match parts.get(index) {
                    Some(Value::String(text)) => text.clone(),
                    _ => "(none)".to_owned(),
                };
                let body: String = text(2).chars().take(3000).collect();
                format!(
                    "page: {}\n#status: {}\nbody text:\n{body}",
                    text(0),
                    text(1)
                )
            }
            Ok(other) => format!("the page could not be described: {other}"),
            Err(e) => format!("the page could not be described: {e}"),
        }
    }
}

/// One of [`Browser::accessibility`]'s lines, from the violation axe-core reported as
/// `{id, impact, help, nodes: [{target, summary}]}`.
fn violation_line(rule: &Value) -> String {
    let text = |value: &Value| value.as_str().unwrap_or("?").to_owned();
    let nodes = rule["nodes"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    let mut targets: Vec<String> = nodes
        .iter()
        .take(TARGETS_SHOWN)
        .map(|node| {
            let parts: Vec<String> = node["target"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or(&[])
                .iter()
                .map(text)
                .collect();
            // Parts past the first are inside a frame.
            parts.join(" >>> ")
        })
        .collect();
    if nodes.len() > TARGETS_SHOWN {
        targets.push(format!("{} more", nodes.len() - TARGETS_SHOWN));
    }
    let summary = nodes
        .first()
        .map(|node| text(&node["summary"]))
        .unwrap_or_default();
    // One line: axe's summary is a heading ("Fix any of the following:") and a line per
    // reason.
    let mut lines = summary
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty());
    let heading = lines.next().unwrap_or_default();
    let summary = format!("{heading} {}", lines.collect::<Vec<_>>().join("; "));
    format!(
        "{} ({}): {} at {}: {summary}",
        text(&rule["id"]),
        text(&rule["impact"]),
        text(&rule["help"]),
        targets.join(", ")
    )
}

impl Drop for Browser {
    fn drop(&mut self) {
        self.driver.delete_session(&self.session);
    }
}
