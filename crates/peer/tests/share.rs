//! The share directory scan: names, symlinks, manifests and rescans, driven directly.

use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::Result;
use peerbus_client::tree;
use peerbus_peer::share::Share;

fn write(path: &Path, data: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, data)?;
    Ok(())
}

fn hash(data: &[u8]) -> String {
    blake3::hash(data).to_hex().to_string()
}

fn names(share: &Share) -> Vec<String> {
    share.files().into_iter().map(|f| f.name).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nested_files_are_named_relative_with_slashes_and_hashed() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("share");
    let big: Vec<u8> = (0..(2 * tree::PIECE_LEN as usize + 77))
        .map(|i| (i * 7 % 253) as u8)
        .collect();
    write(&root.join("a.txt"), b"alpha")?;
    write(&root.join("sub/b.txt"), b"bravo")?;
    write(&root.join("sub/deeper/c.bin"), &big)?;
    write(&root.join("empty"), b"")?;

    let share = Share::open(&root, None).await?;
    assert_eq!(
        names(&share),
        ["a.txt", "empty", "sub/b.txt", "sub/deeper/c.bin"]
    );
    for (name, content) in [
        ("a.txt", &b"alpha"[..]),
        ("empty", b""),
        ("sub/b.txt", b"bravo"),
        ("sub/deeper/c.bin", &big),
    ] {
        let f = share.find(name).expect("found by name");
        assert_eq!(f.entry.hash, hash(content), "{name}");
        assert_eq!(f.manifest.hash, hash(content), "{name}");
        assert_eq!(f.entry.size, content.len() as u64, "{name}");
        assert!(f.path.is_absolute(), "{name}");
        tree::verify_manifest(&f.manifest, &hash(content))?;
        assert_eq!(share.get(&f.entry.hash).as_deref(), Some(&*f), "{name}");
    }
    let c = share.find("sub/deeper/c.bin").expect("c.bin");
    assert_eq!(c.manifest.pieces.len(), 3);
    assert_eq!(
        c.path,
        std::fs::canonicalize(root.join("sub/deeper/c.bin"))?
    );
    // Hashes are accepted in any case.
    assert!(share.get(&hash(b"alpha").to_uppercase()).is_some());
    Ok(())
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symlinks_are_followed_only_inside_the_share() -> Result<()> {
    use std::os::unix::fs::symlink;
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("share");
    let outside = dir.path().join("outside");
    write(&root.join("a.txt"), b"alpha")?;
    write(&root.join("real/b.txt"), b"bravo")?;
    write(&outside.join("secret.txt"), b"secret")?;
    symlink(outside.join("secret.txt"), root.join("leak.txt"))?;
    symlink(&outside, root.join("leakdir"))?;
    symlink(root.join("real"), root.join("alias"))?;
    symlink(root.join("a.txt"), root.join("link-to-a"))?;
    // A loop inside the share must not hang the walk.
    symlink(&root, root.join("real/loop"))?;

    let share = Share::open(&root, None).await?;
    let all = share.files();
    assert!(
        all.iter().all(|f| f.hash != hash(b"secret")),
        "a file outside the share is offered: {all:?}"
    );
    assert!(share.find("leak.txt").is_none());
    assert!(share.find("leakdir/secret.txt").is_none());
    // Inside links resolve; equal content is offered once, under a name without a link.
    assert_eq!(names(&share), ["a.txt", "real/b.txt"]);
    let b = share
        .find("alias/b.txt")
        .expect("a linked directory is walked");
    assert_eq!(b.entry.hash, hash(b"bravo"));
    assert!(b.linked);
    let a = share.find("link-to-a").expect("an inside link is followed");
    assert_eq!(a.entry.hash, hash(b"alpha"));
    assert_eq!(a.path, std::fs::canonicalize(root.join("a.txt"))?);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rescan_adds_new_files_drops_removed_ones_and_rehashes_changed_ones() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("share");
    write(&root.join("keep.txt"), b"keep")?;
    write(&root.join("gone.txt"), b"gone")?;
    write(&root.join("sub/edit.txt"), b"before")?;
    let share = Share::open(&root, None).await?;
    assert_eq!(names(&share), ["gone.txt", "keep.txt", "sub/edit.txt"]);

    assert!(share.rescan().await?.is_empty(), "nothing changed yet");

    write(&root.join("sub/new/fresh.txt"), b"fresh")?;
    std::fs::remove_file(root.join("gone.txt"))?;
    // Another length, so the change is seen whatever the file system's time resolution.
    write(&root.join("sub/edit.txt"), b"after the edit")?;
    let changes = share.rescan().await?;
    let added: Vec<&str> = changes.added.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(added, ["sub/edit.txt", "sub/new/fresh.txt"]);
    assert_eq!(changes.added[0].hash, hash(b"after the edit"));
    assert_eq!(changes.added[1].hash, hash(b"fresh"));
    let mut removed = vec![hash(b"gone"), hash(b"before")];
    removed.sort();
    assert_eq!(changes.removed, removed);
    assert_eq!(
        names(&share),
        ["keep.txt", "sub/edit.txt", "sub/new/fresh.txt"]
    );
    assert!(share.get(&hash(b"gone")).is_none());
    assert!(share.find("gone.txt").is_none());

    assert!(share.rescan().await?.is_empty(), "a second rescan is quiet");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hashing_reports_progress_up_to_the_total() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("share");
    let sizes = [3 * tree::PIECE_LEN as usize / 2, 1000, 0, 70_000];
    for (i, n) in sizes.iter().enumerate() {
        write(&root.join(format!("f{i}")), &vec![i as u8; *n])?;
    }
    let calls: Arc<Mutex<Vec<(u64, u64)>>> = Arc::default();
    let seen = calls.clone();
    let share = Share::open(
        &root,
        Some(Arc::new(move |done, total| {
            seen.lock().unwrap().push((done, total))
        })),
    )
    .await?;
    assert_eq!(share.files().len(), 4);
    let calls = calls.lock().unwrap().clone();
    let total: u64 = sizes.iter().map(|&n| n as u64).sum();
    assert!(!calls.is_empty());
    assert!(
        calls.iter().all(|&(d, t)| t == total && d <= total),
        "{calls:?}"
    );
    assert_eq!(calls.last(), Some(&(total, total)));
    Ok(())
}

#[tokio::test]
async fn a_missing_share_directory_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    assert!(Share::open(&dir.path().join("nope"), None).await.is_err());
}
