//! A `syncbridge run` child process for the kill -9 crash tests (`tests/push_crash.rs`,
//! `tests/pull_crash.rs`): wait, kill -9, SIGTERM with a bounded wait, log tail on failure.
//! Included with `#[path = "common/run.rs"] mod run;`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// One `syncbridge run` child; SIGKILLed and reaped on drop.
pub struct Run {
    pub child: Option<Child>,
    pub log: PathBuf,
}

impl Run {
    /// Starts `bin run file` in `cwd` (its own state directory, like another machine), stderr
    /// to `log`, `RUST_LOG=info`.
    pub fn start_in(bin: &str, cwd: &Path, file: &Path, log: PathBuf) -> Run {
        std::fs::create_dir_all(cwd).unwrap();
        let child = Command::new(bin)
            .current_dir(cwd)
            .arg("run")
            .arg(file)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start syncbridge run");
        Run {
            child: Some(child),
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("child running").id()
    }

    /// Polls for exit for up to `dur`; `Some(status)` if the child exited in that time.
    pub async fn wait_exit(&mut self, dur: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + dur;
        loop {
            let child = self.child.as_mut()?;
            if let Some(s) = child.try_wait().unwrap() {
                self.child = None;
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Panics with the log tail if the child has exited.
    pub fn assert_alive(&mut self, what: &str) {
        if let Some(child) = self.child.as_mut()
            && let Some(s) = child.try_wait().unwrap()
        {
            self.child = None;
            panic!(
                "{what}: syncbridge exited on its own with {s}:\n{}",
                tail(&self.log)
            );
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            // std's Child::kill is SIGKILL on Unix.
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then waits up to 30 s for the exit.
    pub async fn terminate(&mut self) -> ExitStatus {
        let pid = self.pid().to_string();
        let ok = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -TERM {pid} failed");
        self.wait_exit(Duration::from_secs(30))
            .await
            .unwrap_or_else(|| {
                panic!(
                    "syncbridge did not exit within 30 s of SIGTERM:\n{}",
                    tail(&self.log)
                )
            })
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}
