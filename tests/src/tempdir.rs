//! A uniquely named scratch directory, removed on drop.

use std::path::{Path, PathBuf};

use anyhow::Result;

pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> Result<TempDir> {
        Self::new_in(&std::env::temp_dir(), prefix)
    }

    /// One under `parent` (another filesystem, e.g. bpffs).
    pub fn new_in(parent: &Path, prefix: &str) -> Result<TempDir> {
        let dir = parent.join(crate::names::unique(prefix));
        std::fs::create_dir_all(&dir)?;
        Ok(TempDir(dir))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Writes `contents` to a new uniquely named file in the directory.
    pub fn file(&self, stem: &str, contents: &str) -> Result<PathBuf> {
        let path = self.0.join(crate::names::unique(stem));
        std::fs::write(&path, contents)?;
        Ok(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
