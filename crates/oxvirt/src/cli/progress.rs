//! Progress of long operations: while a request runs, the job the engine records under the
//! request's correlation id is polled and its current step shown; after it, the object is
//! polled until its status reaches the one asked for (or a failed one, or the timeout).
//!
//! On a terminal this is an `indicatif` bar of the job's steps (done of all, the current one
//! named) with the elapsed time, and a spinner while an object's status is awaited; otherwise
//! (pipes, logs, tests) each new message is one line on stderr; `--quiet` shows nothing.
//! Progress never goes to stdout, which carries only the command's result.

use std::future::Future;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;

use super::api::Api;
use super::output::at;

/// How often statuses are polled.
const POLL: Duration = Duration::from_millis(400);

pub struct Progress {
    label: String,
    bar: Option<ProgressBar>,
    plain: bool,
    last: String,
    start: Instant,
}

impl Progress {
    pub fn new(label: impl Into<String>, quiet: bool) -> Progress {
        let tty = std::io::stderr().is_terminal();
        let bar = (!quiet && tty).then(ProgressBar::new_spinner);
        Progress::with_bar(label.into(), bar, !quiet && !tty)
    }

    fn with_bar(label: String, bar: Option<ProgressBar>, plain: bool) -> Progress {
        let p = Progress {
            label,
            bar,
            plain,
            last: String::new(),
            start: Instant::now(),
        };
        if let Some(b) = &p.bar {
            b.set_prefix(p.label.clone());
            b.enable_steady_tick(Duration::from_millis(100));
        }
        p.spinner();
        p
    }

    /// A spinner: while nothing counts (an object's status is awaited).
    fn spinner(&self) {
        if let Some(b) = &self.bar {
            b.set_style(
                ProgressStyle::with_template("{spinner:.green} [{elapsed_precise}] {prefix}: {wide_msg}")
                    .expect("template"),
            );
        }
    }

    /// The job's progress: `done` of `total` steps, `step` the current one.
    pub fn steps(&mut self, done: u64, total: u64, step: &str) {
        match &self.bar {
            Some(b) => {
                if b.length() != Some(total) {
                    b.set_style(
                        ProgressStyle::with_template(
                            "{spinner:.green} [{elapsed_precise}] {prefix}: [{bar:24.cyan/blue}] {pos}/{len} {wide_msg}",
                        )
                        .expect("template")
                        .progress_chars("=> "),
                    );
                    b.set_length(total);
                }
                b.set_position(done);
                self.set(step);
            }
            None => self.set(&format!("{step} ({done}/{total} steps done)")),
        }
    }

    pub fn set(&mut self, msg: &str) {
        if msg == self.last {
            return;
        }
        self.last = msg.to_string();
        if let Some(b) = &self.bar {
            b.set_message(msg.to_string());
        } else if self.plain {
            eprintln!(
                "[{:6.1}s] {}: {msg}",
                self.start.elapsed().as_secs_f64(),
                self.label
            );
        }
    }

    pub fn finish(&mut self, msg: &str) {
        if let Some(b) = self.bar.take() {
            b.finish_with_message(msg.to_string());
        } else if self.plain {
            self.set(msg);
        }
    }

    pub fn abandon(&mut self) {
        if let Some(b) = self.bar.take() {
            b.abandon();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.abandon();
    }
}

/// A correlation id unique to this invocation.
pub fn correlation_id(what: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("cli-{what}-{}-{nanos:08x}", std::process::id())
}

/// Where the job with this correlation id is: its steps done and all, and what it does now.
struct JobProgress {
    done: u64,
    total: u64,
    /// "<job>: <current step>" (or the job's status when it has no steps).
    message: String,
}

async fn job_progress(api: &Api, corr: &str) -> Option<JobProgress> {
    let jobs = api
        .list("jobs", "job", &[("search", format!("correlation_id={corr}"))])
        .await
        .ok()?;
    let job = jobs.last()?;
    let id = job["id"].as_str()?;
    let steps = api.list(&format!("jobs/{id}/steps"), "step", &[]).await.ok()?;
    let total = steps.len();
    let done = steps
        .iter()
        .filter(|s| s["status"].as_str() != Some("started"))
        .count();
    let current = steps
        .iter()
        .rev()
        .find(|s| s["status"].as_str() == Some("started"))
        .or(steps.last());
    let desc = job["description"].as_str().unwrap_or("job");
    let message = match current.and_then(|s| s["description"].as_str()) {
        Some(step) => format!("{desc}: {step}"),
        None => format!("{desc}: {}", job["status"].as_str().unwrap_or("?")),
    };
    Some(JobProgress {
        done: done as u64,
        total: total as u64,
        message,
    })
}

/// Runs `request` (which carries `corr` as its correlation id), showing its job's progress.
pub async fn with_job<F>(api: &Api, p: &mut Progress, corr: &str, request: F) -> anyhow::Result<Value>
where
    F: Future<Output = anyhow::Result<Value>>,
{
    tokio::pin!(request);
    let mut tick = tokio::time::interval(POLL);
    tick.tick().await;
    loop {
        tokio::select! {
            r = &mut request => return r,
            _ = tick.tick() => {
                match job_progress(api, corr).await {
                    Some(j) if j.total > 0 => p.steps(j.done, j.total, &j.message),
                    Some(j) => p.set(&j.message),
                    None => {}
                }
            }
        }
    }
}

/// What to wait for: the object at `path` until `field` is one of `want`.
pub struct Until<'a> {
    pub path: String,
    pub what: String,
    pub field: &'a str,
    pub want: &'a [&'a str],
    /// Values that end the wait with an error.
    pub fail: &'a [&'a str],
    pub timeout: Duration,
}

/// Polls until the object's `field` is wanted; returns the object.
pub async fn wait(api: &Api, p: &mut Progress, u: Until<'_>) -> anyhow::Result<Value> {
    let deadline = Instant::now() + u.timeout;
    p.spinner();
    loop {
        let obj = api.get(&u.path).await?;
        let now = at(&obj, u.field)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let detail = obj["status_detail"].as_str().unwrap_or("");
        let msg = if detail.is_empty() {
            format!("{} {now}", u.field)
        } else {
            format!("{} {now} ({detail})", u.field)
        };
        p.set(&msg);
        if u.want.contains(&now.as_str()) {
            return Ok(obj);
        }
        if u.fail.contains(&now.as_str()) {
            anyhow::bail!(
                "{} is {now}{}, not {}",
                u.what,
                if detail.is_empty() {
                    String::new()
                } else {
                    format!(" ({detail})")
                },
                u.want.join(" or ")
            );
        }
        if Instant::now() >= deadline {
            anyhow::bail!(
                "gave up after {:?} waiting for {} to be {} (it is {now}); the engine goes on with it",
                u.timeout,
                u.what,
                u.want.join(" or ")
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use indicatif::ProgressDrawTarget;

    #[test]
    fn a_job_s_steps_fill_a_bar_and_awaiting_a_status_spins() {
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::hidden());
        let mut p = Progress::with_bar("start VM vm1".into(), Some(bar.clone()), false);
        assert_eq!(bar.length(), None, "a spinner until the job's steps are known");
        p.steps(2, 5, "Starting VM vm1: Taking the leases");
        assert_eq!((bar.position(), bar.length()), (2, Some(5)));
        assert_eq!(bar.message(), "Starting VM vm1: Taking the leases");
        p.steps(5, 5, "Starting VM vm1: Recording the VM");
        assert_eq!(bar.position(), 5);
        p.finish("done");
        assert!(bar.is_finished());
    }

    #[test]
    fn without_a_terminal_each_change_is_one_line_with_the_step_count() {
        let mut p = Progress::with_bar("start VM vm1".into(), None, false);
        p.steps(1, 3, "Starting VM vm1: Locking");
        assert_eq!(p.last, "Starting VM vm1: Locking (1/3 steps done)");
        p.steps(1, 3, "Starting VM vm1: Locking");
        assert_eq!(
            p.last, "Starting VM vm1: Locking (1/3 steps done)",
            "unchanged: not repeated"
        );
    }
}
