//! The one way tests run the real `switchboard` binary: `Binary::serve()` sets it up (a data
//! dir, environment overrides or a config file), `spawn()` starts it and waits until it says
//! where it listens, keeps every stdout line, and the process is killed when the value drops.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub const BIN: &str = env!("CARGO_BIN_EXE_switchboard");

/// A running server process.
pub struct Binary {
    pub child: Child,
    /// The HTTP (or HTTPS) listener.
    pub addr: SocketAddr,
    /// The TURN UDP listener, when `wait_for_turn` asked for it.
    pub turn: Option<SocketAddr>,
    /// Every line it wrote to stdout so far.
    pub log: Arc<Mutex<Vec<String>>>,
}

/// A server about to start.
pub struct Spawn {
    cmd: Command,
    wait_turn: bool,
}

impl Binary {
    /// `switchboard serve`, logging at `info` to a pipe the harness reads.
    pub fn serve() -> Spawn {
        let mut cmd = Command::new(BIN);
        cmd.arg("serve")
            .env("SWITCHBOARD_LOG__LEVEL", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        Spawn {
            cmd,
            wait_turn: false,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// SIGKILL, and wait for it.
    pub fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Sends `sig` (`-TERM`, `-INT`, `-HUP`).
    pub fn signal(&self, sig: &str) {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success());
    }

    /// Resident memory now, in kB.
    pub fn rss_kb(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap()
            .parse()
            .unwrap()
    }

    /// Whether some stdout line so far satisfies `f`.
    pub fn logged(&self, f: impl Fn(&str) -> bool) -> bool {
        self.log.lock().unwrap().iter().any(|l| f(l))
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Spawn {
    /// Standalone test defaults: `data_dir`, HTTP on port 0, TURN off, and the per-address
    /// and per-user rates off (tests register many users and send bursts on purpose).
    pub fn in_dir(mut self, data_dir: &Path) -> Self {
        self.cmd
            .env("SWITCHBOARD_DATA_DIR", data_dir)
            .env("SWITCHBOARD_HTTP__LISTEN", "127.0.0.1:0")
            .env("SWITCHBOARD_TURN__ENABLED", "false")
            .env("SWITCHBOARD_AUTH__REGISTER_MAX_PER_IP", "0")
            .env("SWITCHBOARD_WS__USER_MESSAGE_RATE", "0");
        self
    }

    /// Reads `path` as the config file (and nothing from the environment's test defaults).
    pub fn config(mut self, path: &Path) -> Self {
        self.cmd.arg("--config").arg(path);
        self
    }

    pub fn env(mut self, key: &str, value: impl AsRef<std::ffi::OsStr>) -> Self {
        self.cmd.env(key, value);
        self
    }

    pub fn envs(mut self, pairs: &[(&str, &str)]) -> Self {
        for (k, v) in pairs {
            self.cmd.env(k, v);
        }
        self
    }

    /// Also wait for the TURN listener's address.
    pub fn wait_for_turn(mut self) -> Self {
        self.wait_turn = true;
        self
    }

    /// Starts it and waits (30 s at most) until it has said where it listens.
    pub fn spawn(mut self) -> Binary {
        let mut child = self.cmd.spawn().expect("spawn switchboard");
        let out = child.stdout.take().unwrap();
        let log: Arc<Mutex<Vec<String>>> = Arc::default();
        let (tx, rx) = std::sync::mpsc::channel();
        let lines = log.clone();
        let wait_turn = self.wait_turn;
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            let (mut http, mut turn) = (None, None);
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                for marker in ["http listening addr=", "https listening addr="] {
                    if let Some(a) = line.split(marker).nth(1) {
                        http = a.split_whitespace().next().map(str::to_owned);
                    }
                }
                if let Some(a) = line.split("turn listening (udp) addr=").nth(1) {
                    turn = a.split_whitespace().next().map(str::to_owned);
                }
                lines.lock().unwrap().push(line);
                if let Some(h) = &http {
                    if !wait_turn || turn.is_some() {
                        if let Some(tx) = tx.take() {
                            let _ = tx.send((h.clone(), turn.clone()));
                        }
                    }
                }
            }
        });
        let (http, turn) = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the binary reports its addresses");
        Binary {
            child,
            addr: http.parse().unwrap(),
            turn: turn.map(|t| t.parse().unwrap()),
            log,
        }
    }
}
