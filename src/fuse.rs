//! The FUSE edge: translates fuser callbacks into [`Fs`] calls on tokio and
//! [`FsError`]s into errno values. No file-system logic lives here.
//!
//! A request that needs no server round trip is answered on the FUSE thread
//! itself, through the `Fs` calls that never wait (`read_now`, `lookup_now`,
//! `create_now`, `write_now`, `getattr_now`, `getxattr_now`, `flush_now`,
//! `release_now`): handing it to a runtime thread and back costs more than
//! answering it.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Once};
use std::time::SystemTime;

use fuser::{
    BsdFileFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow,
    WriteFlags,
};
use tokio::runtime::Handle;

use crate::fs::namespace::Kind;
use crate::fs::posix;
use crate::fs::posix_ops::{AttrChange, Owner};
use crate::fs::{self, Attr, DirItem, Fs, FsError, ReadNow};
use crate::passthrough::{Answer, Passthrough};

pub struct FuseAdapter {
    fs: Arc<Fs>,
    rt: Handle,
    mountpoint: PathBuf,
    /// Set once the kernel readahead has been tuned (after INIT).
    tuned: Once,
    /// Which inodes the kernel reads by itself, from which local file.
    passthrough: Arc<Passthrough>,
}

impl FuseAdapter {
    pub fn new(fs: Arc<Fs>, rt: Handle, mountpoint: PathBuf) -> Self {
        let passthrough = Arc::new(Passthrough::new(fs.settings().passthrough));
        Self { fs, rt, mountpoint, tuned: Once::new(), passthrough }
    }

    /// Raises the kernel readahead to `--read-ahead`, on the first open (INIT
    /// has been answered by then, and INIT can only lower it). With the
    /// kernel's 128 KiB, a sequential reader costs eight FUSE round trips per
    /// MiB; with 1 MiB, one. Random reads are not affected: the kernel reads
    /// a lone random read as it is, whatever the readahead.
    fn tune_read_ahead(&self) {
        self.tuned.call_once(|| {
            let bytes = self.fs.settings().read_ahead;
            if bytes == 0 {
                return;
            }
            match crate::host::set_read_ahead(&self.mountpoint, bytes) {
                Ok(file) => tracing::debug!("kernel readahead set to {} KiB ({})", bytes / 1024, file.display()),
                Err(e) => tracing::info!(
                    "kernel readahead left at its default (sequential reads arrive in 128 KiB requests): cannot set it: {e}"
                ),
            }
        });
    }
}

fn file_attr(s: &crate::spec::FsSettings, a: &Attr) -> FileAttr {
    let (mut kind, mut perm, nlink) = match a.kind {
        Kind::Dir => (FileType::Directory, s.dir_mode, 2),
        Kind::File => (FileType::RegularFile, s.file_mode, 1),
    };
    // With --posix-metadata: what the object stores, where it stores it.
    let p = a.posix.as_deref().map(|p| &p.posix);
    if let Some(mode) = p.and_then(|p| p.mode) {
        perm = (mode & 0o7777) as u16;
        if a.kind == Kind::File && mode & posix::S_IFMT == posix::S_IFLNK {
            kind = FileType::Symlink;
        }
    }
    let mtime = p.and_then(|p| p.mtime).unwrap_or(a.mtime);
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: p.and_then(|p| p.atime).unwrap_or(mtime),
        mtime,
        ctime: p.and_then(|p| p.ctime).unwrap_or(mtime),
        crtime: mtime,
        kind,
        perm,
        nlink,
        uid: p.and_then(|p| p.uid).unwrap_or(s.uid),
        gid: p.and_then(|p| p.gid).unwrap_or(s.gid),
        rdev: 0,
        blksize: 128 * 1024,
        flags: 0,
    }
}

/// The creator of a new entry and its permission bits (umask applied).
fn owner(req: &Request, mode: u32, umask: u32) -> Owner {
    Owner { uid: req.uid(), gid: req.gid(), perm: mode & !umask & 0o7777 }
}

/// Answers a getxattr or listxattr: the size when asked for it (`size` 0),
/// ERANGE when the caller's buffer is too small, else the bytes.
fn xattr_reply(reply: ReplyXattr, size: u32, value: Result<Vec<u8>, FsError>) {
    match value {
        Ok(v) if size == 0 => reply.size(v.len() as u32),
        Ok(v) if v.len() > size as usize => reply.error(Errno::ERANGE),
        Ok(v) => reply.data(&v),
        Err(e) => reply.error(errno(&e)),
    }
}

fn errno(e: &FsError) -> Errno {
    Errno::from_i32(e.errno())
}

fn empty(reply: ReplyEmpty, result: Result<(), FsError>) {
    match result {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(&e)),
    }
}

/// Fails an open that cannot share the backing file its inode is passed
/// through to (see [`crate::passthrough`]).
fn busy(reply: ReplyOpen, ino: u64) {
    tracing::warn!(
        ino,
        "open refused with EBUSY: the file is open elsewhere in passthrough mode on its cached copy, and this open \
         (a write, or a newer version of the object) cannot share it; retry once the other handles close, or mount \
         with --no-passthrough"
    );
    reply.error(Errno::EBUSY)
}

/// Answers a lookup in `parent`. A miss is a negative entry (inode 0), so
/// the kernel remembers it for the directory's TTL, as the in-process cache
/// does.
fn entry(fs: &Fs, parent: u64, got: Result<Attr, FsError>, reply: ReplyEntry, this: &impl Fn(&Attr) -> FileAttr) {
    match got {
        Ok(a) => reply.entry(&a.ttl, &this(&a), Generation(0)),
        Err(FsError::NotFound) => match fs.dir_ttl(parent) {
            Some(ttl) if !ttl.is_zero() => {
                let attr = Attr {
                    ino: 0,
                    kind: Kind::File,
                    size: 0,
                    mtime: std::time::UNIX_EPOCH,
                    ttl,
                    read_only: true,
                    posix: None,
                };
                reply.entry(&ttl, &this(&attr), Generation(0))
            }
            _ => reply.error(Errno::ENOENT),
        },
        Err(e) => reply.error(errno(&e)),
    }
}

fn name_str(name: &OsStr) -> Option<String> {
    name.to_str().map(str::to_string)
}

impl Filesystem for FuseAdapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.add_capabilities(InitFlags::FUSE_DO_READDIRPLUS);
        // O_TRUNC comes with the OPEN instead of as a SETATTR after it, so an
        // overwrite (`> file`) streams from empty and a truncating
        // read-write open keeps nothing of the old object: neither downloads
        // it first (for passthrough, or to truncate it).
        let _ = config.add_capabilities(InitFlags::FUSE_ATOMIC_O_TRUNC);
        // INIT can only lower the readahead; `tune_read_ahead` raises it later.
        let ra = self.fs.settings().read_ahead.clamp(128 << 10, u32::MAX as u64) as u32;
        if let Err(max) = config.set_max_readahead(ra) {
            let _ = config.set_max_readahead(max);
        }
        let _ = config.set_max_background(64);
        if self.passthrough.is_on() {
            // Stack depth 1: backing files on a plain file system, and this
            // mount may still be a lower layer of overlayfs.
            match config.add_capabilities(InitFlags::FUSE_PASSTHROUGH) {
                Ok(()) => {
                    let _ = config.set_max_stack_depth(1);
                }
                Err(_) => self.passthrough.turn_off("the kernel does not offer FUSE passthrough (Linux 6.9 or later)"),
            }
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let Some(name) = name_str(name) else {
            return reply.error(Errno::ENOENT);
        };
        let (fs, this) = (self.fs.clone(), self.attr_maker());
        // An answer the caches hold is sent from this thread.
        if let Some(got) = fs.lookup_now(parent.0, &name) {
            return entry(&fs, parent.0, got, reply, &this);
        }
        self.rt.spawn(async move {
            let got = fs.lookup(parent.0, &name).await;
            entry(&fs, parent.0, got, reply, &this)
        });
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.fs.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let this = self.attr_maker();
        match self.fs.getattr_now(ino.0) {
            Some(Ok(a)) => return reply.attr(&a.ttl, &this(&a)),
            Some(Err(e)) => return reply.error(errno(&e)),
            None => {}
        }
        let fs = self.fs.clone();
        self.rt.spawn(async move {
            match fs.getattr(ino.0).await {
                Ok(a) => reply.attr(&a.ttl, &this(&a)),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.tune_read_ahead();
        let (fs, passthrough) = (self.fs.clone(), self.passthrough.clone());
        let pid = req.pid();
        let writing = flags.0 & libc::O_ACCMODE != libc::O_RDONLY || flags.0 & libc::O_TRUNC != 0;
        self.rt.spawn(async move {
            // A write is counted before it is made: it must not fail after
            // the file system has started it (see `passthrough`). One that
            // finds the inode passed through to its writer's staging file
            // shares that file instead.
            let shares = match writing && !passthrough.reserve(ino.0) {
                false => false,
                true if fs.local_writer_file(ino.0).is_some_and(|f| passthrough.passed_to(ino.0, &f)) => true,
                true if passthrough.settle(ino.0).await && passthrough.reserve(ino.0) => false,
                true => return busy(reply, ino.0),
            };
            let (fh, keep) = match fs.open(ino.0, flags.0, pid).await {
                Ok(opened) => opened,
                Err(e) => {
                    if writing && !shares {
                        passthrough.unreserve(ino.0);
                    }
                    return reply.error(errno(&e));
                }
            };
            let cached = if keep { FopenFlags::FOPEN_KEEP_CACHE } else { FopenFlags::empty() };
            let register = |f: &std::fs::File| reply.open_backing(f);
            let answer = if writing && !shares {
                passthrough.bind(ino.0, fh);
                match passthrough.alone(ino.0, fh) {
                    true => match fs.passthrough_file(fh, flags.0).await {
                        Some(file) => passthrough.upgrade(ino.0, fh, &file, register),
                        None => Answer::Cached,
                    },
                    false => Answer::Cached,
                }
            } else {
                let file = match passthrough.is_on() {
                    true => fs.passthrough_file(fh, flags.0).await,
                    false => None,
                };
                let mut answer = passthrough.open_read(ino.0, fh, file.as_deref(), register);
                if matches!(answer, Answer::Busy) && !writing && passthrough.settle(ino.0).await {
                    answer = passthrough.open_read(ino.0, fh, file.as_deref(), register);
                }
                answer
            };
            match answer {
                Answer::Passthrough(backing) => {
                    crate::metrics::metrics().passthrough_opens.inc();
                    reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), &backing)
                }
                Answer::Cached => reply.opened(FileHandle(fh), cached),
                Answer::Busy => {
                    fs.release(fh).await;
                    busy(reply, ino.0)
                }
            }
        });
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        // Bytes already in memory are sent from this thread; only reads that
        // must wait go to the runtime.
        let now = {
            let _runtime = self.rt.enter();
            self.fs.read_now(fh.0, offset, size)
        };
        let started = match now {
            ReadNow::Done(data) => return reply.data_vectored(&data.io_slices()),
            ReadNow::Started(range) => Some(range),
            ReadNow::Wait => None,
        };
        let fs = self.fs.clone();
        self.rt.spawn(async move {
            let got = match started {
                Some(range) => fs.finish_read(fh.0, range).await,
                None => fs.read(fh.0, offset, size).await,
            };
            match got {
                Ok(data) => reply.data_vectored(&data.io_slices()),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn flush(&self, req: &Request, _ino: INodeNo, fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        let pid = req.pid();
        if let Some(done) = self.fs.flush_now(fh.0, pid) {
            return empty(reply, done);
        }
        let fs = self.fs.clone();
        self.rt.spawn(async move { empty(reply, fs.flush(fh.0, pid).await) });
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        let fs = self.fs.clone();
        self.rt.spawn(async move { empty(reply, fs.fsync(fh.0).await) });
    }

    fn fsyncdir(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        // Directory changes are in S3 when their operation returns.
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.passthrough.release(fh.0);
        let Some(last) = self.fs.release_now(fh.0) else {
            return reply.ok();
        };
        let fs = self.fs.clone();
        self.rt.spawn(async move {
            fs.release_last(last).await;
            reply.ok();
        });
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let Some(name) = name_str(name) else {
            return reply.error(Errno::EINVAL);
        };
        let (fs, this, passthrough) = (self.fs.clone(), self.attr_maker(), self.passthrough.clone());
        let pid = req.pid();
        let owner = owner(req, mode, umask);
        // A new inode: nothing passes it through. (An existing one reaches
        // `open`, unless it appeared meanwhile.)
        let answer = move |created: Result<(Attr, u64), FsError>, reply: ReplyCreate| match created {
            Ok((a, fh)) if !passthrough.reserve(a.ino) => Err((fh, reply)),
            Ok((a, fh)) => {
                passthrough.bind(a.ino, fh);
                reply.created(&a.ttl, &this(&a), Generation(0), FileHandle(fh), FopenFlags::empty());
                Ok(())
            }
            Err(e) => {
                reply.error(errno(&e));
                Ok(())
            }
        };
        // A file written in order is created from this thread.
        if let Some(created) = fs.create_now(parent.0, &name, flags, pid, Some(owner)) {
            if let Err((fh, reply)) = answer(created, reply) {
                self.rt.spawn(async move {
                    fs.release(fh).await;
                    reply.error(Errno::EBUSY)
                });
            }
            return;
        }
        self.rt.spawn(async move {
            let created = fs.create_as(parent.0, &name, flags, pid, Some(owner)).await;
            if let Err((fh, reply)) = answer(created, reply) {
                fs.release(fh).await;
                reply.error(Errno::EBUSY)
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        // A write that is a copy into a streaming buffer is done here.
        if let Some(n) = self.fs.write_now(fh.0, offset, data) {
            return reply.written(n);
        }
        let fs = self.fs.clone();
        let data = data.to_vec();
        self.rt.spawn(async move {
            match fs.write(fh.0, offset, &data).await {
                Ok(n) => reply.written(n),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let (fs, this) = (self.fs.clone(), self.attr_maker());
        let time = |t: TimeOrNow| match t {
            TimeOrNow::SpecificTime(t) => t,
            TimeOrNow::Now => SystemTime::now(),
        };
        let (atime, mtime) = (atime.map(time), mtime.map(time));
        let change = AttrChange { mode, uid, gid, atime, mtime };
        if fs.settings().posix_metadata {
            self.rt.spawn(async move {
                let mut result = Ok(None);
                if size.is_some() {
                    result = fs.setattr(ino.0, size, None).await.map(Some);
                }
                if result.is_ok() && !change.is_empty() {
                    result = fs.change_attrs(ino.0, change).await.map(Some);
                }
                let result = match result {
                    Ok(Some(a)) => Ok(a),
                    Ok(None) => fs.getattr(ino.0).await,
                    Err(e) => Err(e),
                };
                match result {
                    Ok(a) => reply.attr(&a.ttl, &this(&a)),
                    Err(e) => reply.error(errno(&e)),
                }
            });
            return;
        }
        self.rt.spawn(async move {
            match fs.setattr(ino.0, size, mtime).await {
                Ok(a) => reply.attr(&a.ttl, &this(&a)),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        let Some(name) = name_str(name) else {
            return reply.error(Errno::EINVAL);
        };
        let (fs, this) = (self.fs.clone(), self.attr_maker());
        let owner = owner(req, mode, umask);
        self.rt.spawn(async move {
            match fs.mkdir_as(parent.0, &name, Some(owner)).await {
                Ok(a) => reply.entry(&a.ttl, &this(&a), Generation(0)),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let Some(name) = name_str(name) else {
            return reply.error(Errno::ENOENT);
        };
        let fs = self.fs.clone();
        self.rt.spawn(async move { empty(reply, fs.unlink(parent.0, &name).await) });
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let Some(name) = name_str(name) else {
            return reply.error(Errno::ENOENT);
        };
        let fs = self.fs.clone();
        self.rt.spawn(async move { empty(reply, fs.rmdir(parent.0, &name).await) });
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let (Some(name), Some(newname)) = (name_str(name), name_str(newname)) else {
            return reply.error(Errno::EINVAL);
        };
        let fs = self.fs.clone();
        self.rt
            .spawn(async move { empty(reply, fs.rename(parent.0, &name, newparent.0, &newname, flags.bits()).await) });
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.fs.opendir(ino.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, reply: ReplyDirectory) {
        let answer = move |fs: &Fs, items: fs::Result<Vec<Arc<DirItem>>>, mut reply: ReplyDirectory| match items {
            Ok(items) => {
                fs.fill_dir(fh.0, ino.0, offset, &items, false, &mut reply);
                reply.ok()
            }
            Err(e) => reply.error(errno(&e)),
        };
        match self.fs.readdir_now(fh.0, offset) {
            Some(items) => answer(&self.fs, items, reply),
            None => {
                let fs = self.fs.clone();
                self.rt.spawn(async move {
                    let items = fs.readdir(fh.0, offset).await;
                    answer(&fs, items, reply)
                });
            }
        }
    }

    fn readdirplus(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, reply: ReplyDirectoryPlus) {
        let (fs, this) = (self.fs.clone(), self.attr_maker());
        let answer = move |fs: &Fs, items: fs::Result<Vec<Arc<DirItem>>>, reply: ReplyDirectoryPlus| match items {
            Ok(items) => {
                let mut plus = PlusReply { reply, attr: &this };
                fs.fill_dir(fh.0, ino.0, offset, &items, true, &mut plus);
                plus.reply.ok()
            }
            Err(e) => reply.error(errno(&e)),
        };
        match fs.readdir_now(fh.0, offset) {
            Some(items) => answer(&fs, items, reply),
            None => {
                self.rt.spawn(async move {
                    let items = fs.readdir(fh.0, offset).await;
                    answer(&fs, items, reply)
                });
            }
        }
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        self.fs.releasedir(fh.0);
        reply.ok();
    }

    // Without --posix-metadata objects carry no extended attributes. ENOSYS
    // makes the kernel answer every later xattr call itself ("not
    // supported"), so `ls -l`, which asks for two attributes of every entry,
    // costs no round trip per entry.
    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        if !self.fs.settings().posix_metadata {
            return reply.error(Errno::ENOSYS);
        }
        let Some(name) = name_str(name) else {
            return reply.error(Errno::ENODATA);
        };
        // `ls -l` asks every entry for `security.selinux` and
        // `system.posix_acl_access`: only `user.*` names are stored, and
        // the metadata `readdir` just read answers the rest on this thread.
        if let Some(value) = self.fs.getxattr_now(ino.0, &name) {
            return xattr_reply(reply, size, value);
        }
        let fs = self.fs.clone();
        self.rt.spawn(async move { xattr_reply(reply, size, fs.getxattr(ino.0, &name).await) });
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        if !self.fs.settings().posix_metadata {
            return reply.error(Errno::ENOSYS);
        }
        let fs = self.fs.clone();
        self.rt.spawn(async move {
            let names = fs.listxattr(ino.0).await.map(|names| {
                let mut out = Vec::new();
                for n in names {
                    out.extend_from_slice(n.as_bytes());
                    out.push(0);
                }
                out
            });
            xattr_reply(reply, size, names)
        });
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        if !self.fs.settings().posix_metadata {
            return reply.error(Errno::ENOSYS);
        }
        let Some(name) = name_str(name) else {
            return reply.error(Errno::ENOTSUP);
        };
        let (fs, value) = (self.fs.clone(), value.to_vec());
        self.rt.spawn(async move { empty(reply, fs.setxattr(ino.0, &name, &value, flags).await) });
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        if !self.fs.settings().posix_metadata {
            return reply.error(Errno::ENOSYS);
        }
        let Some(name) = name_str(name) else {
            return reply.error(Errno::ENODATA);
        };
        let fs = self.fs.clone();
        self.rt.spawn(async move { empty(reply, fs.removexattr(ino.0, &name).await) });
    }

    fn symlink(&self, req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        if !self.fs.settings().posix_metadata {
            return reply.error(Errno::EPERM);
        }
        let (Some(name), Some(target)) = (name_str(link_name), target.to_str().map(str::to_string)) else {
            return reply.error(Errno::EINVAL);
        };
        let (fs, this) = (self.fs.clone(), self.attr_maker());
        let owner = Owner { uid: req.uid(), gid: req.gid(), perm: 0o777 };
        self.rt.spawn(async move {
            match fs.symlink(parent.0, &name, &target, owner).await {
                Ok(a) => reply.entry(&a.ttl, &this(&a), Generation(0)),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        if !self.fs.settings().posix_metadata {
            return reply.error(Errno::ENOSYS);
        }
        let fs = self.fs.clone();
        self.rt.spawn(async move {
            match fs.readlink(ino.0).await {
                Ok(target) => reply.data(&target),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        if !self.fs.settings().posix_metadata {
            return reply.error(Errno::ENOSYS);
        }
        let Some(name) = name_str(name) else {
            return reply.error(Errno::EINVAL);
        };
        let (fs, this) = (self.fs.clone(), self.attr_maker());
        let (owner, pid) = (owner(req, mode, umask), req.pid());
        self.rt.spawn(async move {
            match fs.mknod(parent.0, &name, mode, owner, pid).await {
                Ok(a) => reply.entry(&a.ttl, &this(&a), Generation(0)),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let s = self.fs.statfs();
        reply.statfs(s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.bsize);
    }
}

impl FuseAdapter {
    /// A cheap closure turning [`Attr`] into [`FileAttr`] inside spawned tasks.
    fn attr_maker(&self) -> impl Fn(&Attr) -> FileAttr + Send + 'static {
        let fs = self.fs.clone();
        move |a| file_attr(fs.settings(), a)
    }
}

impl fs::reply::DirReply for ReplyDirectory {
    fn add(&mut self, next: u64, item: &DirItem, attr: &Attr) -> bool {
        let kind = if attr.kind == Kind::Dir { FileType::Directory } else { FileType::RegularFile };
        // fuser's `add` says whether the buffer is full.
        !ReplyDirectory::add(self, INodeNo(attr.ino), next, kind, &item.name)
    }
}

/// A READDIRPLUS reply and how to turn attributes into the kernel's.
struct PlusReply<'a, F: Fn(&Attr) -> FileAttr> {
    reply: ReplyDirectoryPlus,
    attr: &'a F,
}

impl<F: Fn(&Attr) -> FileAttr> fs::reply::DirReply for PlusReply<'_, F> {
    fn add(&mut self, next: u64, item: &DirItem, attr: &Attr) -> bool {
        !self.reply.add(INodeNo(attr.ino), next, &item.name, &attr.ttl, &(self.attr)(attr), Generation(0))
    }
}
