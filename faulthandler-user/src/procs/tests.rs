//! The tracker on this process and its parent: no root needed.
use super::*;

#[test]
fn tree_and_threads() {
    let own = std::process::id();
    let mut child = std::process::Command::new("sleep")
        .arg("5")
        .spawn()
        .unwrap();
    let t = tree(own);
    assert_eq!(t[0], own);
    assert!(t.contains(&child.id()), "{t:?}");
    let _ = child.kill();
    let _ = child.wait();
    // A thread id names its process.
    let (tx, rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let h = std::thread::spawn(move || {
        // SAFETY: gettid has no preconditions.
        tx.send(unsafe { libc::gettid() } as u32).unwrap();
        let _ = done_rx.recv();
    });
    let tid = rx.recv().unwrap();
    assert_ne!(tid, own);
    assert_eq!(tgid_of(tid), Some(own));
    done_tx.send(()).unwrap();
    h.join().unwrap();
    assert_eq!(tgid_of(own), Some(own));
}

#[test]
fn tracks_itself() {
    let mut t = Tracker::default();
    let pid = std::process::id();
    t.refresh(pid).unwrap();
    let info = t.get(pid).unwrap();
    let here = tracks_itself as *const () as usize as u64;
    let m = crate::modules::find(&info.modules, here).expect("own text mapping");
    assert!(info.exe.as_deref().is_some_and(|e| m.name == e));
}

#[test]
fn young_processes_wait_for_settle() {
    let mut t = Tracker::default();
    let own = std::process::id();
    t.exec(own, "/proc/self/exe");
    let born = t.born[&own];
    assert!(t.next_refresh_in().is_some_and(|d| d <= SETTLE));
    t.refresh_stale_at(born + SETTLE / 2);
    assert!(t.get(own).is_none(), "read while younger than SETTLE");
    assert_eq!(t.stale, [own], "still due");
    t.refresh_stale_at(born + SETTLE);
    assert!(t.get(own).is_some(), "read once SETTLE has passed");
    assert!(t.stale.is_empty() && t.born.is_empty());
    assert_eq!(t.next_refresh_in(), None);
}

#[test]
fn processes_not_seen_starting_are_read_at_once() {
    let mut t = Tracker::default();
    let own = std::process::id();
    t.mark_stale(own);
    t.refresh_stale();
    assert!(t.get(own).is_some());
}

#[test]
fn forgotten_processes_are_not_read() {
    let mut t = Tracker::default();
    let own = std::process::id();
    t.fork(1, own); // parent unknown: the child is marked stale
    assert_eq!(t.stale, [own]);
    t.forget(own);
    assert!(t.stale.is_empty() && t.born.is_empty());
    t.refresh_stale_at(Instant::now() + SETTLE);
    assert!(t.get(own).is_none());
}

#[test]
fn refresh_all_reads_running_processes() {
    let mut t = Tracker::default();
    let n = t.refresh_all();
    let parent = std::os::unix::process::parent_id();
    assert!(n >= 1, "{n}");
    let info = t.get(parent).expect("parent process read");
    assert!(!info.modules.is_empty());
    assert!(t.get(std::process::id()).is_none(), "own pid skipped");
    // Kernel threads (kthreadd is pid 2 on a host) are skipped.
    let kthreadd = fs::read_to_string("/proc/2/comm").is_ok_and(|c| c.trim() == "kthreadd");
    assert!(!kthreadd || t.get(2).is_none());
}
