//! The QMP client against a real QEMU (no guest needed: a machine started paused with `-S`).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use oxvirt_qemu::qmp::{self, Event, Qmp, QmpError};
use oxvirt_qemu::QemuTool;

struct KillOnDrop(Child);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_qemu(sock: &Path) -> KillOnDrop {
    let qemu = QemuTool::SystemX86_64.locate().unwrap_or_else(|e| panic!("{e}"));
    let child = Command::new(qemu)
        .args(["-nodefaults", "-no-user-config", "-S", "-display", "none"])
        .args(["-machine", "q35", "-accel", "tcg", "-m", "64M"])
        .arg("-chardev")
        .arg(format!(
            "socket,id=qmp,path={},server=on,wait=off",
            sock.display()
        ))
        .args(["-mon", "chardev=qmp,mode=control"])
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn qemu");
    let start = std::time::Instant::now();
    while !sock.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "QMP socket never appeared"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    KillOnDrop(child)
}

async fn next_event(ev: &mut qmp::EventStream) -> Option<Event> {
    tokio::time::timeout(Duration::from_secs(20), ev.recv())
        .await
        .expect("no QMP event within 20 s")
}

#[tokio::test]
async fn commands_events_errors_and_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("qmp.sock");
    let mut qemu = start_qemu(&sock);

    let (q, mut ev) = Qmp::connect(&sock).await.unwrap();
    assert_eq!(q.version().major, 7, "QEMU 7.x expected");
    let st = q.execute(&qmp::QueryStatus {}).await.unwrap();
    assert!(!st.running);
    assert_eq!(st.status, "prelaunch");

    q.execute(&qmp::Cont {}).await.unwrap();
    assert_eq!(next_event(&mut ev).await, Some(Event::Resume));
    q.execute(&qmp::Stop {}).await.unwrap();
    assert_eq!(next_event(&mut ev).await, Some(Event::Stop));
    assert_eq!(q.execute(&qmp::QueryStatus {}).await.unwrap().status, "paused");

    // A refused command comes back typed, with QEMU's class.
    let err = q
        .execute_raw("no-such-command", serde_json::Value::Null)
        .await
        .unwrap_err();
    assert_eq!(err.class(), Some("CommandNotFound"), "{err}");
    let err = q
        .execute(&qmp::BlockdevDel {
            node_name: "missing".into(),
        })
        .await
        .unwrap_err();
    assert!(matches!(err, QmpError::Command { .. }), "{err}");

    // Concurrent commands each get their own reply.
    let (a, b, c) = tokio::join!(
        q.execute(&qmp::QueryStatus {}),
        q.execute(&qmp::QueryCpusFast {}),
        q.execute(&qmp::QueryMigrate {})
    );
    assert!(!a.unwrap().running);
    assert_eq!(b.unwrap().len(), 1);
    assert_eq!(c.unwrap().status, None);

    // A QEMU that stops answering (here: SIGSTOP) costs a caller its time limit, not forever;
    // once it answers again the connection works and the late reply is not taken for another.
    let pid = qemu.0.id() as i32;
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    let t = std::time::Instant::now();
    let err = q
        .execute_within(&qmp::QueryStatus {}, Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err}");
    assert!(err.to_string().contains("query-status"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
    let cpus = q.execute(&qmp::QueryCpusFast {}).await.unwrap();
    assert_eq!(cpus.len(), 1);
    assert_eq!(q.execute(&qmp::QueryStatus {}).await.unwrap().status, "paused");

    // The node restarts: the old connection goes away and a new one is accepted.
    drop(q);
    drop(ev);
    let (q, mut ev) = Qmp::connect(&sock).await.unwrap();
    assert_eq!(q.execute(&qmp::QueryStatus {}).await.unwrap().status, "paused");

    q.execute(&qmp::Quit {}).await.unwrap();
    match next_event(&mut ev).await {
        Some(Event::Shutdown { guest, reason }) => {
            assert!(!guest);
            assert_eq!(reason, "host-qmp-quit");
        }
        other => panic!("expected SHUTDOWN, got {other:?}"),
    }
    // QEMU exits: the stream ends and later commands fail as Closed.
    assert_eq!(next_event(&mut ev).await, None);
    let err = q.execute(&qmp::QueryStatus {}).await.unwrap_err();
    assert!(matches!(err, QmpError::Closed { .. }), "{err}");
    assert!(qemu.0.wait().unwrap().success());
}

#[tokio::test]
async fn connecting_to_a_missing_socket_names_it() {
    let err = Qmp::connect(Path::new("/nonexistent/qmp.sock"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("/nonexistent/qmp.sock"), "{err}");
}
