//! POSIX metadata in object user metadata, in the formats s3fs uses, so a
//! bucket moves between s3fs and bucketfs with modes, owners, times,
//! symlinks and extended attributes intact. Pure functions, no I/O.
//!
//! The headers (user metadata names, without `x-amz-meta-`):
//! - `mode`: the whole `st_mode` in decimal, file type bits included
//!   (`33188` is a regular file with 0644; `41471` a symlink with 0777);
//! - `uid`, `gid`: decimal;
//! - `mtime`, `ctime`, `atime`: seconds since the epoch in decimal, with
//!   `.` and nine digits of nanoseconds when there are any. rclone writes
//!   `mtime` as seconds with a shorter decimal fraction (`1606223458.4385817`);
//!   both are read as decimal fractions;
//! - `xattr`: the URL-encoded text `{"name":"base64(value)",...}`.
//!
//! A symlink is an object whose body is the target and whose mode has
//! `S_IFLNK`. A directory keeps its metadata on its `dir/` marker. s3fs's
//! older directory objects are a key `dir` without the slash marked by
//! `Content-Type: application/x-directory` (or a mode with `S_IFDIR`), and
//! `dir_$folder$`.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};

use crate::store::ObjectAttrs;

pub const S_IFMT: u32 = libc::S_IFMT;
pub const S_IFREG: u32 = libc::S_IFREG;
pub const S_IFDIR: u32 = libc::S_IFDIR;
pub const S_IFLNK: u32 = libc::S_IFLNK;

/// S3's limit on user metadata, names and values, in bytes.
pub const METADATA_LIMIT: usize = 2048;
/// The longest key S3 accepts, in bytes.
pub const KEY_MAX: usize = 1024;
/// The suffix of the directory objects some tools (s3fs, old S3 consoles) make.
pub const FOLDER_SUFFIX: &str = "_$folder$";

const MODE: &str = "mode";
const UID: &str = "uid";
const GID: &str = "gid";
const MTIME: &str = "mtime";
const CTIME: &str = "ctime";
const ATIME: &str = "atime";
const XATTR: &str = "xattr";

/// What s3fs's URL encoding of the xattr header leaves alone: letters,
/// digits and `.-_~/`.
const XATTR_ENCODE: &AsciiSet = &NON_ALPHANUMERIC.remove(b'.').remove(b'-').remove(b'_').remove(b'~').remove(b'/');

/// POSIX attributes of one object, as stored (or as defaulted when absent).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Posix {
    /// Whole `st_mode`, type bits included, when stored.
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub mtime: Option<SystemTime>,
    pub ctime: Option<SystemTime>,
    pub atime: Option<SystemTime>,
}

impl Posix {
    /// Reads the s3fs headers (and rclone's `mtime`) from user metadata.
    /// Values that do not parse are ignored.
    pub fn from_metadata(meta: &BTreeMap<String, String>) -> Self {
        let num = |k: &str| meta.get(k).and_then(|v| v.trim().parse::<u32>().ok());
        let time = |k: &str| meta.get(k).and_then(|v| parse_time(v));
        Posix {
            mode: num(MODE),
            uid: num(UID),
            gid: num(GID),
            mtime: time(MTIME),
            ctime: time(CTIME),
            atime: time(ATIME),
        }
    }

    /// Writes the attributes that are set into `meta`, as s3fs formats them.
    pub fn write_into(&self, meta: &mut BTreeMap<String, String>) {
        let mut set = |k: &str, v: Option<String>| {
            if let Some(v) = v {
                meta.insert(k.to_string(), v);
            }
        };
        set(MODE, self.mode.map(|m| m.to_string()));
        set(UID, self.uid.map(|m| m.to_string()));
        set(GID, self.gid.map(|m| m.to_string()));
        set(MTIME, self.mtime.map(format_time));
        set(CTIME, self.ctime.map(format_time));
        set(ATIME, self.atime.map(format_time));
    }

    pub fn is_symlink(&self) -> bool {
        self.mode.is_some_and(|m| m & S_IFMT == S_IFLNK)
    }

    pub fn is_dir(&self) -> bool {
        self.mode.is_some_and(|m| m & S_IFMT == S_IFDIR)
    }
}

/// Seconds since the epoch, optionally with a decimal fraction (s3fs writes
/// nine digits, rclone fewer). Negative or malformed values: `None`.
pub fn parse_time(s: &str) -> Option<SystemTime> {
    let s = s.trim();
    let (secs, frac) = match s.split_once('.') {
        Some((a, b)) => (a, b),
        None => (s, ""),
    };
    if secs.is_empty() || !secs.bytes().all(|b| b.is_ascii_digit()) || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let secs: u64 = secs.parse().ok()?;
    // The first nine digits of the fraction are nanoseconds; more are dropped.
    let mut nanos: u32 = 0;
    for i in 0..9 {
        nanos = nanos * 10 + frac.as_bytes().get(i).map_or(0, |b| u32::from(b - b'0'));
    }
    UNIX_EPOCH.checked_add(Duration::new(secs, nanos))
}

/// s3fs's format: `secs`, or `secs.nnnnnnnnn` when there are nanoseconds.
/// Times before the epoch are written as 0.
pub fn format_time(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    if d.subsec_nanos() == 0 { d.as_secs().to_string() } else { format!("{}.{:09}", d.as_secs(), d.subsec_nanos()) }
}

/// True if an object `key` (without a trailing slash) is one of s3fs's
/// older directory objects: `Content-Type: application/x-directory` (or
/// `httpd/unix-directory`), or a stored mode with `S_IFDIR`.
pub fn is_dir_object(attrs: &ObjectAttrs) -> bool {
    let ct = attrs.content_type.as_deref().unwrap_or("");
    let ct = ct.split(';').next().unwrap_or("").trim();
    ct.eq_ignore_ascii_case("application/x-directory")
        || ct.eq_ignore_ascii_case("httpd/unix-directory")
        || Posix::from_metadata(&attrs.metadata).is_dir()
}

/// The directory name of an s3fs/S3-console `name_$folder$` object.
pub fn folder_object_name(name: &str) -> Option<&str> {
    name.strip_suffix(FOLDER_SUFFIX).filter(|n| !n.is_empty())
}

/// The Content-Type an upload of `key` gets, from its file name (as s3fs and
/// rclone guess it); `None` when the extension says nothing.
pub fn content_type_for(key: &str) -> Option<String> {
    let name = key.rsplit('/').next().unwrap_or(key);
    mime_guess::from_path(name).first_raw().map(str::to_string)
}

/// Extended attributes: name to value.
pub type Xattrs = BTreeMap<String, Vec<u8>>;

/// Reads s3fs's `xattr` header. Pairs that do not parse are skipped, as
/// s3fs does.
pub fn decode_xattrs(header: &str) -> Xattrs {
    let text: Vec<u8> = percent_decode_str(header).collect();
    let text = String::from_utf8_lossy(&text);
    let mut out = Xattrs::new();
    let (Some(start), Some(end)) = (text.find('{'), text.rfind('}')) else {
        return out;
    };
    if end <= start {
        return out;
    }
    for pair in text[start + 1..end].split(',') {
        let Some((k, v)) = pair.rsplit_once(':') else { continue };
        let (Some(k), Some(v)) = (unquote(k), unquote(v)) else { continue };
        if let Some(v) = base64_decode(v) {
            out.insert(k.to_string(), v);
        }
    }
    out
}

fn unquote(s: &str) -> Option<&str> {
    s.trim().strip_prefix('"')?.strip_suffix('"')
}

/// Writes s3fs's `xattr` header: `{"name":"base64",...}`, URL-encoded.
pub fn encode_xattrs(xattrs: &Xattrs) -> String {
    let mut raw = String::from("{");
    for (i, (k, v)) in xattrs.iter().enumerate() {
        if i > 0 {
            raw.push(',');
        }
        raw.push('"');
        raw.push_str(k);
        raw.push_str("\":\"");
        raw.push_str(&base64_encode(v));
        raw.push('"');
    }
    raw.push('}');
    utf8_percent_encode(&raw, XATTR_ENCODE).to_string()
}

/// The extended attributes in user metadata.
pub fn xattrs_of(meta: &BTreeMap<String, String>) -> Xattrs {
    meta.get(XATTR).map(|h| decode_xattrs(h)).unwrap_or_default()
}

/// Stores `xattrs` in user metadata (no header when there are none).
pub fn set_xattrs(meta: &mut BTreeMap<String, String>, xattrs: &Xattrs) {
    if xattrs.is_empty() {
        meta.remove(XATTR);
    } else {
        meta.insert(XATTR.to_string(), encode_xattrs(xattrs));
    }
}

/// Why user metadata cannot be stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TooLarge {
    /// This attribute alone cannot fit (`E2BIG`).
    Alone,
    /// It would fit, but not with what the object carries already (`ENOSPC`).
    WithOthers,
}

/// Checks that `meta` fits S3's 2 KB limit. `alone` is the metadata with
/// only the changed attribute (and the POSIX headers), to tell the two
/// failures apart.
pub fn check_size(meta: &BTreeMap<String, String>, alone: &BTreeMap<String, String>) -> Result<(), TooLarge> {
    let len = |m: &BTreeMap<String, String>| m.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>();
    if len(meta) <= METADATA_LIMIT {
        Ok(())
    } else if len(alone) > METADATA_LIMIT {
        Err(TooLarge::Alone)
    } else {
        Err(TooLarge::WithOthers)
    }
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding (what s3fs writes).
pub fn base64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Standard base64, padding optional; `None` if malformed.
pub fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let s = s.trim_end_matches('=');
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes() {
        let v = B64.iter().position(|&b| b == c)? as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// True if an xattr name can be stored in s3fs's format (which has no
/// escaping inside its quotes): no `"`, `,`; a `:` is fine because the
/// value (base64) never holds one and the split is at the last `:`.
pub fn xattr_name_ok(name: &str) -> bool {
    !name.is_empty() && !name.contains(['"', ',', '\0'])
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn meta(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn reads_s3fs_headers() {
        let m = meta(&[
            ("mode", "33188"),
            ("uid", "1000"),
            ("gid", "100"),
            ("mtime", "1700000000"),
            ("ctime", "1700000001.000000500"),
            ("atime", "bogus"),
        ]);
        let p = Posix::from_metadata(&m);
        assert_eq!(p.mode, Some(0o100644));
        assert_eq!((p.uid, p.gid), (Some(1000), Some(100)));
        assert_eq!(p.mtime, Some(UNIX_EPOCH + Duration::from_secs(1_700_000_000)));
        assert_eq!(p.ctime, Some(UNIX_EPOCH + Duration::new(1_700_000_001, 500)));
        assert_eq!(p.atime, None);
        assert!(!p.is_symlink() && !p.is_dir());
        assert!(Posix { mode: Some(41471), ..Default::default() }.is_symlink());
        assert!(Posix { mode: Some(16877), ..Default::default() }.is_dir());
    }

    #[test]
    fn rclone_mtime_is_a_decimal_fraction() {
        assert_eq!(parse_time("1606223458.4385817"), Some(UNIX_EPOCH + Duration::new(1_606_223_458, 438_581_700)));
        assert_eq!(parse_time("12.5"), Some(UNIX_EPOCH + Duration::new(12, 500_000_000)));
        assert_eq!(parse_time("12.1234567891"), Some(UNIX_EPOCH + Duration::new(12, 123_456_789)));
        for bad in ["", "-1", "1e9", "a", "1.2.3", ".5"] {
            assert_eq!(parse_time(bad), None, "{bad}");
        }
    }

    #[test]
    fn writes_s3fs_format() {
        assert_eq!(format_time(UNIX_EPOCH + Duration::from_secs(5)), "5");
        assert_eq!(format_time(UNIX_EPOCH + Duration::new(5, 7)), "5.000000007");
        let mut m = BTreeMap::new();
        Posix { mode: Some(0o120777), uid: Some(0), gid: None, ..Default::default() }.write_into(&mut m);
        assert_eq!(m, meta(&[("mode", "41471"), ("uid", "0")]));
    }

    #[test]
    fn xattrs_in_s3fs_format() {
        let mut x = Xattrs::new();
        x.insert("user.a".into(), b"hello".to_vec());
        x.insert("user.b c".into(), vec![0, 255, 10]);
        let h = encode_xattrs(&x);
        // What s3fs writes for the same attributes.
        assert_eq!(h, "%7B%22user.a%22%3A%22aGVsbG8%3D%22%2C%22user.b%20c%22%3A%22AP8K%22%7D");
        assert_eq!(decode_xattrs(&h), x);
        // Lower-case escapes and unescaped text read too; bad pairs are skipped.
        assert_eq!(
            decode_xattrs("{\"user.a\":\"aGVsbG8=\",junk}"),
            Xattrs::from([("user.a".into(), b"hello".to_vec())])
        );
        assert!(decode_xattrs("%7b%7d").is_empty());
        assert!(decode_xattrs("nothing").is_empty());
    }

    #[test]
    fn directory_objects_and_content_types() {
        let dir = ObjectAttrs::typed(Some("application/x-directory; charset=UTF-8".into()));
        assert!(is_dir_object(&dir));
        assert!(is_dir_object(&ObjectAttrs { content_type: None, metadata: meta(&[("mode", "16877")]) }));
        assert!(!is_dir_object(&ObjectAttrs::typed(Some("text/plain".into()))));
        assert_eq!(folder_object_name("a_$folder$"), Some("a"));
        assert_eq!(folder_object_name("_$folder$"), None);
        assert_eq!(content_type_for("d/notes.txt").as_deref(), Some("text/plain"));
        assert_eq!(content_type_for("x.html").as_deref(), Some("text/html"));
        assert_eq!(content_type_for("d.e/README"), None);
    }

    #[test]
    fn size_limit() {
        let small = meta(&[("mode", "33188")]);
        assert_eq!(check_size(&small, &small), Ok(()));
        let big = meta(&[("xattr", &"x".repeat(3000))]);
        assert_eq!(check_size(&big, &big), Err(TooLarge::Alone));
        let both = meta(&[("xattr", &"x".repeat(1500)), ("other", &"y".repeat(1000))]);
        let alone = meta(&[("xattr", &"x".repeat(1500))]);
        assert_eq!(check_size(&both, &alone), Err(TooLarge::WithOthers));
    }

    #[tokio::test]
    async fn memory_store_keeps_attrs_and_replaces_them_on_copy() {
        use crate::store::{ObjectStore, PutCondition, memory::MemoryStore};
        let s = MemoryStore::new();
        let a = ObjectAttrs { content_type: Some("text/plain".into()), metadata: meta(&[("mode", "33188")]) };
        let e1 = s.put_with("k", bytes::Bytes::from_static(b"x"), PutCondition::None, &a).await.unwrap();
        assert_eq!(s.head_attrs("k").await.unwrap().1, a);
        s.copy("k", "k2", None).await.unwrap();
        assert_eq!(s.attrs("k2"), Some(a.clone()));
        let b = ObjectAttrs { content_type: None, metadata: meta(&[("mode", "33261")]) };
        assert_eq!(
            s.copy_replace("k", "k", &b, Some("\"nope\"")).await,
            Err(crate::store::StoreError::PreconditionFailed)
        );
        let e2 = s.copy_replace("k", "k", &b, Some(&e1)).await.unwrap();
        assert_ne!(e1, e2);
        assert_eq!(s.attrs("k"), Some(b.clone()));
        assert_eq!(s.body("k").as_deref(), Some(&b"x"[..]));
        let id = s.create_multipart_with("m", &a).await.unwrap();
        let part = s.upload_part("m", &id, 1, bytes::Bytes::from_static(b"y")).await.unwrap();
        s.complete_multipart("m", &id, vec![part], PutCondition::None).await.unwrap();
        assert_eq!(s.attrs("m"), Some(a));
    }

    proptest! {
        #[test]
        fn base64_round_trip(data in prop::collection::vec(any::<u8>(), 0..100)) {
            prop_assert_eq!(base64_decode(&base64_encode(&data)), Some(data));
        }

        #[test]
        fn time_round_trip(secs in 0u64..1u64 << 40, nanos in 0u32..1_000_000_000) {
            let t = UNIX_EPOCH + Duration::new(secs, nanos);
            prop_assert_eq!(parse_time(&format_time(t)), Some(t));
        }

        #[test]
        fn xattrs_round_trip(x in prop::collection::btree_map("user\\.[a-z0-9 .:{}\"%,é]{1,12}", prop::collection::vec(any::<u8>(), 0..40), 0..5)) {
            // s3fs's format cannot hold a name with `"`, `,` or `:` after it
            // is decoded; bucketfs refuses such names when they are set.
            let x: Xattrs = x.into_iter().filter(|(k, _)| xattr_name_ok(k)).collect();
            prop_assert_eq!(decode_xattrs(&encode_xattrs(&x)), x);
        }

        #[test]
        fn posix_round_trip(mode in any::<u32>(), uid in any::<u32>(), gid in any::<u32>(), secs in 0u64..1u64 << 40, nanos in 0u32..1_000_000_000) {
            let t = UNIX_EPOCH + Duration::new(secs, nanos);
            let p = Posix { mode: Some(mode), uid: Some(uid), gid: Some(gid), mtime: Some(t), ctime: Some(t), atime: None };
            let mut m = BTreeMap::new();
            p.write_into(&mut m);
            prop_assert_eq!(Posix::from_metadata(&m), p);
        }
    }
}
