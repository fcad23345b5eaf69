//! Input and output helpers that every source shares: line readers that name the file and line
//! in every error, transparent gzip, and atomic writes (a crash never leaves a half-written
//! output behind).

use anyhow::{anyhow, bail, Context, Result};
use flate2::read::MultiGzDecoder;
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};

/// Reads a text file line by line, keeping the 1-based line number for error messages.
/// Gzip input (recognised by its magic bytes, whatever the file name) is decompressed on the
/// fly, so a 10 GB review file is streamed, never loaded.
pub struct LineReader {
    path: PathBuf,
    reader: Box<dyn BufRead>,
    line_no: usize,
    progress: Option<ProgressBar>,
    last_terminated: bool,
}

impl LineReader {
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_inner(path, false)
    }

    /// Like [`LineReader::open`], with a progress bar over the (compressed) bytes read.
    pub fn open_with_progress(path: &Path) -> Result<Self> {
        Self::open_inner(path, true)
    }

    fn open_inner(path: &Path, show_progress: bool) -> Result<Self> {
        let mut file =
            File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let mut magic = [0u8; 2];
        let n = read_up_to(&mut file, &mut magic)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        let is_gzip = n == 2 && magic == [0x1f, 0x8b];
        let head = std::io::Cursor::new(magic[..n].to_vec());
        // No terminal bar where the process reports progress elsewhere (the Python binding).
        let progress =
            (show_progress && !crate::progress::has_sink()).then(|| progress_bar(len, path));
        let raw: Box<dyn Read> = match &progress {
            Some(pb) => Box::new(pb.wrap_read(head.chain(file))),
            None => Box::new(head.chain(file)),
        };
        let reader: Box<dyn BufRead> = if is_gzip {
            Box::new(BufReader::with_capacity(
                1 << 20,
                MultiGzDecoder::new(BufReader::with_capacity(1 << 20, raw)),
            ))
        } else {
            Box::new(BufReader::with_capacity(1 << 20, raw))
        };
        Ok(Self {
            path: path.to_path_buf(),
            reader,
            line_no: 0,
            progress,
            last_terminated: true,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The number of the line returned last (1-based).
    pub fn line_no(&self) -> usize {
        self.line_no
    }

    /// The next line as bytes, without its line ending, read into `buf`; `None` at the end of
    /// the file. (The caller owns the buffer so that the reader stays free for [`Self::error`].)
    pub fn next_bytes<'b>(&mut self, buf: &'b mut Vec<u8>) -> Result<Option<&'b [u8]>> {
        buf.clear();
        let n = self.reader.read_until(b'\n', buf).map_err(|e| {
            let what = if e.kind() == std::io::ErrorKind::UnexpectedEof
                || e.kind() == std::io::ErrorKind::InvalidInput
                || e.kind() == std::io::ErrorKind::InvalidData
            {
                "truncated or corrupt gzip stream"
            } else {
                "read error"
            };
            anyhow!(
                "{}: after line {}: {what}: {e}",
                self.path.display(),
                self.line_no
            )
        })?;
        if n == 0 {
            if let Some(pb) = &self.progress {
                pb.finish_and_clear();
            }
            return Ok(None);
        }
        self.line_no += 1;
        if self.line_no.is_multiple_of(1 << 16) {
            // A stop request (Ctrl-C in the Python binding) reaches a long read too.
            crate::progress::check()?;
        }
        self.last_terminated = buf.last() == Some(&b'\n');
        while matches!(buf.last(), Some(b'\n' | b'\r')) {
            buf.pop();
        }
        Ok(Some(buf))
    }

    /// The next line as UTF-8 text; invalid UTF-8 is an error naming the line.
    pub fn next_str<'b>(&mut self, buf: &'b mut Vec<u8>) -> Result<Option<&'b str>> {
        match self.next_bytes(buf)? {
            None => Ok(None),
            Some(bytes) => std::str::from_utf8(bytes).map(Some).map_err(|e| {
                self.error(format!(
                    "invalid UTF-8 at byte {}: expected UTF-8 text",
                    e.valid_up_to() + 1
                ))
            }),
        }
    }

    /// Refuses a file whose last line has no line ending, for formats that always end lines
    /// with one (MovieLens' `.dat` files): such a file was cut off mid-line, and its last
    /// row may still parse, as a different row. Call after the last line was read.
    pub fn ensure_complete(&self, format: &str) -> Result<()> {
        if self.last_terminated {
            return Ok(());
        }
        Err(self.error(format!(
            "the last line has no line ending: the file looks truncated (every line of {format} ends with a newline)"
        )))
    }

    /// An error that names this file and the current line.
    pub fn error(&self, msg: impl std::fmt::Display) -> anyhow::Error {
        InputError(format!("{}:{}: {msg}", self.path.display(), self.line_no)).into()
    }
}

/// Input that cannot be used as given (a file's line, a field, an id): the caller's to fix,
/// not a failure of the program. The Python binding raises these as `ValueError`.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct InputError(pub String);

fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// A byte-based progress bar on stderr (hidden when stderr is not a terminal).
pub fn progress_bar(len: u64, path: &Path) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec}, eta {eta})",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    pb.set_message(
        path.file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
    );
    pb
}

/// Decodes Latin-1 (ISO-8859-1) bytes: every byte is the code point of the same value.
pub fn latin1_to_string(bytes: &[u8]) -> String {
    bytes.iter().map(|&b| b as char).collect()
}

/// Titles are stored in TSV files: tabs and line breaks inside them become spaces.
pub fn clean_field(s: &str) -> String {
    let t = s.trim();
    if t.contains(['\t', '\n', '\r']) {
        t.replace(['\t', '\n', '\r'], " ")
    } else {
        t.to_string()
    }
}

/// SHA-256 of a file, as lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("{}: read error", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// A directory that becomes visible under its final name only when complete: files are written
/// into a hidden sibling, which [`AtomicDir::commit`] renames into place. Dropped without a
/// commit (an error, a panic), the sibling is removed, so nothing partial is left behind.
/// The target is locked ([`OutputLock`]) from `create` until the `AtomicDir` is dropped, so of
/// two writers the second fails at once, and one that starts after the first has finished
/// finds its output and refuses to replace it unless told to.
pub struct AtomicDir {
    tmp: PathBuf,
    target: PathBuf,
    committed: bool,
    _lock: OutputLock,
}

impl AtomicDir {
    /// Starts writing `target`. An existing non-empty `target` is an error unless `overwrite`,
    /// and even then unless it holds `marker` (the file that makes it this kind of output, e.g.
    /// a dataset's `dataset.json`): `--force` replaces outputs, never any other directory.
    pub fn create(target: &Path, overwrite: bool, marker: &str) -> Result<Self> {
        let lock = OutputLock::acquire(target)?;
        if target.exists() {
            let empty = target.is_dir()
                && fs::read_dir(target)
                    .map(|mut d| d.next().is_none())
                    .unwrap_or(false);
            if !empty && !overwrite {
                bail!(
                    "{}: already exists (pass --force to replace it)",
                    target.display()
                );
            }
            if !empty && !target.join(marker).is_file() {
                bail!(
                    "{}: exists and holds no {marker}; --force replaces only what collm wrote there",
                    target.display()
                );
            }
        }
        let tmp = sibling(target, "tmp")?;
        if tmp.exists() {
            fs::remove_dir_all(&tmp).ok();
        }
        fs::create_dir_all(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
        Ok(Self {
            tmp,
            target: target.to_path_buf(),
            committed: false,
            _lock: lock,
        })
    }

    /// Where to write the files.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    pub fn commit(mut self) -> Result<()> {
        let old = if self.target.exists() {
            let old = sibling(&self.target, "old")?;
            fs::rename(&self.target, &old)
                .with_context(|| format!("{}: cannot move aside", self.target.display()))?;
            Some(old)
        } else {
            None
        };
        crash_point();
        fs::rename(&self.tmp, &self.target)
            .with_context(|| format!("{}: cannot rename into place", self.target.display()))?;
        self.committed = true;
        crash_point();
        if let Some(old) = old {
            fs::remove_dir_all(&old).ok();
        }
        Ok(())
    }
}

impl Drop for AtomicDir {
    fn drop(&mut self) {
        if !self.committed {
            fs::remove_dir_all(&self.tmp).ok();
        }
    }
}

fn sibling(target: &Path, what: &str) -> Result<PathBuf> {
    let name = target
        .file_name()
        .ok_or_else(|| anyhow!("{}: not a valid output path", target.display()))?
        .to_string_lossy();
    let parent = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok(parent.join(format!(".{name}.{what}-{}", std::process::id())))
}

/// Writes a file atomically: a temporary sibling, flushed, then renamed over `path`.
/// A directory where a file is to go is refused before anything is written (no temporary file
/// is left beside it), and a failed write removes its temporary file.
pub fn write_file_atomic(path: &Path, contents: &[u8]) -> Result<()> {
    if path.is_dir() {
        bail!("{}: is a directory (expected a file path)", path.display());
    }
    let tmp = sibling(path, "tmp")?;
    crash_point();
    let written = (|| -> Result<()> {
        let mut f =
            File::create(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
        f.write_all(contents)
            .and_then(|_| f.sync_all())
            .with_context(|| format!("{}: write error", tmp.display()))?;
        drop(f);
        crash_point();
        fs::rename(&tmp, path)
            .with_context(|| format!("{}: cannot rename into place", path.display()))
    })();
    if written.is_err() {
        fs::remove_file(&tmp).ok();
    }
    written?;
    crash_point();
    Ok(())
}

/// Writes a text file atomically ([`write_file_atomic`]), gzip-compressed where its name ends in
/// `.gz` ([`LineReader`] reads either back, whatever the name). The compressed bytes depend on
/// the text alone (no time or name in the gzip header), so the same text gives the same file.
pub fn write_text_atomic(path: &Path, text: &str) -> Result<()> {
    if path.extension().is_some_and(|e| e == "gz") {
        let mut z = flate2::write::GzEncoder::new(
            Vec::with_capacity(text.len() / 2),
            flate2::Compression::best(),
        );
        z.write_all(text.as_bytes())
            .with_context(|| format!("{}: cannot compress", path.display()))?;
        let bytes = z
            .finish()
            .with_context(|| format!("{}: cannot compress", path.display()))?;
        write_file_atomic(path, &bytes)
    } else {
        write_file_atomic(path, text.as_bytes())
    }
}

/// The permissions a new file gets from this process's umask (`0o666 & !umask`), for files
/// written through libraries that create them owner-only (the safetensors writer): a run
/// others may read stays readable. Linux reads the umask from /proc/self/status; elsewhere 0o644.
pub fn umask_file_mode() -> u32 {
    use std::sync::OnceLock;
    static MODE: OnceLock<u32> = OnceLock::new();
    *MODE.get_or_init(|| {
        let umask = fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Umask:"))
                    .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
            })
            .unwrap_or(0o022);
        0o666 & !umask
    })
}

/// Gives `path` the permissions of a file this process creates ([`umask_file_mode`]).
pub fn set_umask_mode(path: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(path, fs::Permissions::from_mode(umask_file_mode()))
            .with_context(|| format!("{}: cannot set permissions", path.display()))?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// Flushes a directory's entries (new names, renames) to disk.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("{}: cannot sync", dir.display()))
}

/// Flushes every file under `dir`, and the directories' entries, to disk.
pub fn sync_tree(dir: &Path) -> Result<()> {
    for e in fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            sync_tree(&p)?;
        } else {
            fs::File::open(&p)
                .and_then(|f| f.sync_all())
                .with_context(|| format!("{}: cannot sync", p.display()))?;
        }
    }
    sync_dir(dir)
}

/// Fault injection for the crash tests: with `COLLM_CRASH_AT=N` in the environment the process
/// aborts at its N-th crash point (no destructors run, as under `kill -9`). Crash points sit
/// between the steps of every atomic write and checkpoint commit. Without the variable this
/// is one atomic load.
pub fn crash_point() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    static AT: OnceLock<Option<u64>> = OnceLock::new();
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let at = AT.get_or_init(|| {
        std::env::var("COLLM_CRASH_AT")
            .ok()
            .and_then(|s| s.trim().parse().ok())
    });
    if let Some(n) = *at {
        if COUNT.fetch_add(1, Ordering::SeqCst) + 1 == n {
            std::process::abort();
        }
    }
}

/// An exclusive lock on an output path (a dataset or run directory), held until dropped: a
/// second writer gets an error at once instead of interleaving with the first. The lock is a
/// hidden sibling file (`.NAME.lock`, `flock`ed; the kernel releases it when the process dies,
/// however it dies), removed again on drop.
#[derive(Debug)]
pub struct OutputLock {
    path: PathBuf,
    file: Option<File>,
}

impl OutputLock {
    pub fn acquire(target: &Path) -> Result<Self> {
        let name = target
            .file_name()
            .ok_or_else(|| anyhow!("{}: not a valid output path", target.display()))?
            .to_string_lossy()
            .into_owned();
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        fs::create_dir_all(&parent)
            .with_context(|| format!("{}: cannot create", parent.display()))?;
        let path = parent.join(format!(".{name}.lock"));
        loop {
            let file = fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .with_context(|| format!("{}: cannot create the lock file", path.display()))?;
            match file.try_lock() {
                Ok(()) => {}
                Err(fs::TryLockError::WouldBlock) => bail!(
                    "{}: another collm process is writing it (lock {} held); wait for it or choose another output",
                    target.display(),
                    path.display()
                ),
                Err(fs::TryLockError::Error(e)) => {
                    return Err(anyhow!(e))
                        .with_context(|| format!("{}: cannot lock", path.display()))
                }
            }
            // The holder before us may have removed the file after we opened it: then our lock
            // is on a file nobody else sees; start over with the current one.
            use std::os::unix::fs::MetadataExt;
            let ours = file.metadata()?;
            match fs::metadata(&path) {
                Ok(now) if now.ino() == ours.ino() && now.dev() == ours.dev() => {
                    return Ok(Self {
                        path,
                        file: Some(file),
                    })
                }
                _ => continue,
            }
        }
    }
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        // Remove while still holding the lock, then release it.
        fs::remove_file(&self.path).ok();
        self.file.take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(path: &Path) -> String {
        let mut r = LineReader::open(path).unwrap();
        let (mut buf, mut out) = (Vec::new(), String::new());
        while let Some(line) = r.next_str(&mut buf).unwrap() {
            out.push_str(line);
            out.push('\n');
        }
        out
    }

    #[test]
    fn text_is_gzipped_by_its_name_and_reads_back_either_way() {
        let dir = tempfile::tempdir().unwrap();
        let text: String = (0..2000)
            .map(|k| format!("{k}\t{}\n", k * 7 % 13))
            .collect();
        let (plain, gz) = (dir.path().join("a.tsv"), dir.path().join("a.tsv.gz"));
        write_text_atomic(&plain, &text).unwrap();
        write_text_atomic(&gz, &text).unwrap();
        assert_eq!(fs::read_to_string(&plain).unwrap(), text);
        let bytes = fs::read(&gz).unwrap();
        assert_eq!(bytes[..2], [0x1f, 0x8b]);
        assert!(bytes.len() < text.len() / 2, "{} bytes", bytes.len());
        assert_eq!(read_all(&gz), text);
        assert_eq!(read_all(&plain), text);
        // The same text, the same bytes (no time in the header); no temporary file left.
        write_text_atomic(&gz, &text).unwrap();
        assert_eq!(fs::read(&gz).unwrap(), bytes);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 2);
    }
}
