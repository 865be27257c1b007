//! Directories only this agent may write: the bpffs pin directory and the
//! handover socket's. Whoever can write in them can unlink the pins (the
//! programs detach) or put its own socket where the next agent looks. On
//! a node where `/sys/fs/bpf` is world-writable (bpffs's default mode is
//! 1777), any user could create them first, so one another user owns is
//! refused, never adopted.

use std::{
    fs, io,
    os::unix::fs::{DirBuilderExt as _, MetadataExt as _, PermissionsExt as _},
    path::Path,
};

/// Creates `dir` (and missing parents) mode 0700, or takes the existing one
/// if this process's user owns it (tightened to 0700). Refused, naming the
/// owner: an existing one owned by anyone else, or `dir` or a parent —
/// symlinks included, as themselves, not as what they point at — owned by
/// anyone but this user or root (its owner could swap `dir` out, or point
/// it at a directory of root's), nor a directory a symlink on the way leads
/// into that is owned by anyone else.
pub fn ensure(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    let meta = fs::metadata(dir)?;
    if meta.uid() != euid {
        return Err(not_ours(dir, meta.uid(), euid));
    }
    // The path as given (a symlink counts as itself: its owner could point
    // it elsewhere), then the directories it resolves to (a root-owned
    // symlink may lead into someone else's).
    let real = fs::canonicalize(dir)?;
    for path in dir
        .ancestors()
        .chain(real.ancestors())
        .filter(|p| !p.as_os_str().is_empty())
    {
        let owner = fs::symlink_metadata(path)?.uid();
        if owner != euid && owner != 0 {
            return Err(not_ours(path, owner, euid));
        }
    }
    if meta.mode() & 0o077 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

fn not_ours(dir: &Path, owner: u32, euid: u32) -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!(
            "{} is owned by uid {owner}, not by this agent (uid {euid}) or root: refused, its owner could unlink or replace what the agent keeps there",
            dir.display()
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_of_ours_is_created_private_and_tightened() {
        let base = std::env::temp_dir().join(format!("epia-private-{}", std::process::id()));
        let dir = base.join("a/b");
        ensure(&dir).expect("create");
        assert_eq!(fs::metadata(&dir).expect("meta").mode() & 0o777, 0o700);
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).expect("chmod");
        ensure(&dir).expect("existing");
        assert_eq!(fs::metadata(&dir).expect("meta").mode() & 0o777, 0o700);
        fs::remove_dir_all(&base).expect("cleanup");
    }
}
