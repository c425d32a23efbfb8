//! What `readdir` needs from the FUSE side, as a trait: the core decides
//! which entries to hand out, counts the kernel's lookups of those it took
//! (READDIRPLUS), gives back the one that did not fit, and sizes the next
//! answer by what fitted; the adapter only encodes entries into the reply.

use super::{Attr, DirItem};

/// A reply buffer that entries are added to until it is full.
pub trait DirReply {
    /// Adds entry `item` with attributes `attr`, at directory offset
    /// `next` (the offset to continue from after it). False when it does
    /// not fit: the kernel never sees it.
    fn add(&mut self, next: u64, item: &DirItem, attr: &Attr) -> bool;
}
