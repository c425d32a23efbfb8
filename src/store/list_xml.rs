//! ListObjectsV2 replies read straight from their XML.
//!
//! The SDK's generic decoder builds every field of every object (owner,
//! storage class, checksums…) and re-scans each element to skip it; for a
//! 5,000-key page that costs more CPU than the server spends listing, on the
//! path every `ls` waits on. This reader walks the tokens once (`xmlparser`,
//! the tokenizer the SDK itself uses) and keeps only what a listing needs.

use std::borrow::Cow;
use std::time::SystemTime;

use aws_smithy_types::DateTime;
use aws_smithy_types::date_time::Format;
use xmlparser::{ElementEnd, Token, Tokenizer};

use super::{ListPage, ObjectMeta, StoreError};

/// The fields read, by where they sit in the reply.
#[derive(Clone, Copy, PartialEq)]
enum Field {
    Key,
    Size,
    ETag,
    LastModified,
    Prefix,
    IsTruncated,
    NextToken,
    ErrorCode,
    ErrorMessage,
}

/// Parses a `ListBucketResult`. An `Error` document sent with status 200 is
/// mapped as the SDK maps error replies (denied, no bucket, or a server error
/// worth retrying); an unreadable reply is a network error, also retried.
pub fn parse(body: &[u8]) -> Result<ListPage, StoreError> {
    let text = std::str::from_utf8(body).map_err(|_| bad("the reply is not UTF-8"))?;
    let mut page = ListPage { objects: Vec::new(), prefixes: Vec::new(), next: None };
    let mut truncated = false;
    let mut error: (Option<String>, Option<String>) = (None, None);
    let mut root: Option<&str> = None;
    let mut closed = false;
    // Local names of the open elements below the root.
    let mut path: Vec<&str> = Vec::with_capacity(4);
    let mut object: Option<ObjectMeta> = None;
    let mut field: Option<Field> = None;
    let mut value = String::new();
    for token in Tokenizer::from(text) {
        match token.map_err(|e| bad(&format!("malformed XML: {e}")))? {
            Token::ElementStart { local, .. } => {
                let local = local.as_str();
                if root.is_none() {
                    root = Some(local);
                    continue;
                }
                if closed {
                    return Err(bad("content after the root element"));
                }
                path.push(local);
                field = match (root, path.as_slice()) {
                    (Some("ListBucketResult"), ["Contents"]) => {
                        object = Some(ObjectMeta {
                            key: String::new(),
                            size: 0,
                            etag: String::new(),
                            last_modified: SystemTime::UNIX_EPOCH,
                        });
                        None
                    }
                    (Some("ListBucketResult"), ["Contents", name]) => match *name {
                        "Key" => Some(Field::Key),
                        "Size" => Some(Field::Size),
                        "ETag" => Some(Field::ETag),
                        "LastModified" => Some(Field::LastModified),
                        _ => None,
                    },
                    (Some("ListBucketResult"), ["CommonPrefixes", "Prefix"]) => Some(Field::Prefix),
                    (Some("ListBucketResult"), ["IsTruncated"]) => Some(Field::IsTruncated),
                    (Some("ListBucketResult"), ["NextContinuationToken"]) => Some(Field::NextToken),
                    (Some("Error"), ["Code"]) => Some(Field::ErrorCode),
                    (Some("Error"), ["Message"]) => Some(Field::ErrorMessage),
                    _ => None,
                };
                value.clear();
            }
            Token::Text { text } if field.is_some() => {
                value.push_str(&unescape(text.as_str()).ok_or_else(|| bad("a bad character reference"))?)
            }
            Token::Cdata { text, .. } if field.is_some() => value.push_str(text.as_str()),
            Token::ElementEnd { end: ElementEnd::Close(..) | ElementEnd::Empty, .. } => {
                if let Some(f) = field.take() {
                    let v = std::mem::take(&mut value);
                    match (f, object.as_mut()) {
                        (Field::Key, Some(o)) => o.key = v,
                        (Field::Size, Some(o)) => o.size = v.trim().parse().map_err(|_| bad("a bad Size"))?,
                        (Field::ETag, Some(o)) => o.etag = v,
                        (Field::LastModified, Some(o)) => {
                            let t = DateTime::from_str(v.trim(), Format::DateTime)
                                .map_err(|_| bad("a bad LastModified"))?;
                            o.last_modified = SystemTime::try_from(t).unwrap_or(SystemTime::UNIX_EPOCH)
                        }
                        (Field::Prefix, _) => page.prefixes.push(v),
                        (Field::IsTruncated, _) => truncated = v.trim() == "true",
                        (Field::NextToken, _) => page.next = Some(v),
                        (Field::ErrorCode, _) => error.0 = Some(v),
                        (Field::ErrorMessage, _) => error.1 = Some(v),
                        _ => {}
                    }
                }
                if path.len() == 1
                    && path[0] == "Contents"
                    && let Some(o) = object.take()
                    && !o.key.is_empty()
                {
                    page.objects.push(o);
                }
                closed |= path.pop().is_none();
            }
            _ => {}
        }
    }
    if root.is_some() && !closed {
        return Err(bad("the reply ends early"));
    }
    match root {
        Some("ListBucketResult") => {}
        Some("Error") => {
            let (code, message) = (error.0.unwrap_or_default(), error.1.unwrap_or_default());
            return Err(match code.as_str() {
                "NoSuchBucket" => StoreError::NoSuchBucket,
                "AccessDenied" | "InvalidAccessKeyId" | "SignatureDoesNotMatch" => StoreError::AccessDenied(code),
                _ => StoreError::Server { status: 503, message: format!("{code}: {message}") },
            });
        }
        Some(other) => return Err(bad(&format!("unexpected root element {other}"))),
        None => return Err(bad("no XML document")),
    }
    if !truncated {
        page.next = None;
    }
    Ok(page)
}

fn bad(what: &str) -> StoreError {
    StoreError::Network(format!("unreadable LIST reply: {what}"))
}

/// Resolves XML's five named entities and numeric character references;
/// `None` for anything else.
fn unescape(s: &str) -> Option<Cow<'_, str>> {
    if !s.contains('&') {
        return Some(Cow::Borrowed(s));
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(at) = rest.find('&') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let end = after.find(';')?;
        let c = match &after[..end] {
            "amp" => '&',
            "lt" => '<',
            "gt" => '>',
            "quot" => '"',
            "apos" => '\'',
            reference => {
                let (digits, radix) = match reference.strip_prefix("#x").or_else(|| reference.strip_prefix("#X")) {
                    Some(hex) => (hex, 16),
                    None => (reference.strip_prefix('#')?, 10),
                };
                if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
                    return None;
                }
                char::from_u32(u32::from_str_radix(digits, radix).ok()?)?
            }
        };
        out.push(c);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Some(Cow::Owned(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::Duration;

    /// As S3 writes a reply: every key and prefix escaped.
    fn escape(s: &str) -> String {
        let mut out = String::new();
        for c in s.chars() {
            match c {
                '&' => out.push_str("&amp;"),
                '<' => out.push_str("&lt;"),
                '>' => out.push_str("&gt;"),
                '"' => out.push_str("&quot;"),
                '\'' => out.push_str("&apos;"),
                c if (c as u32) < 0x20 => out.push_str(&format!("&#x{:X};", c as u32)),
                c => out.push(c),
            }
        }
        out
    }

    fn reply(keys: &[(String, u64)], prefixes: &[String], token: Option<&str>) -> String {
        let mut x = String::from(
            r#"<?xml version="1.0" encoding="UTF-8"?>
<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Name>bkt</Name><Prefix>d/</Prefix>"#,
        );
        x.push_str(&format!("<KeyCount>{}</KeyCount><MaxKeys>1000</MaxKeys><Delimiter>/</Delimiter>", keys.len()));
        x.push_str(&format!("<IsTruncated>{}</IsTruncated>", token.is_some()));
        for (key, size) in keys {
            x.push_str(&format!(
                "<Contents><Key>{}</Key><LastModified>2026-11-23T10:00:00.000Z</LastModified>\
                 <ETag>&quot;{size:x}&quot;</ETag><Size>{size}</Size><Owner><ID>o</ID><DisplayName>x</DisplayName>\
                 </Owner><StorageClass>STANDARD</StorageClass></Contents>",
                escape(key)
            ));
        }
        for p in prefixes {
            x.push_str(&format!("<CommonPrefixes><Prefix>{}</Prefix></CommonPrefixes>", escape(p)));
        }
        if let Some(t) = token {
            x.push_str(&format!("<NextContinuationToken>{}</NextContinuationToken>", escape(t)));
        }
        x.push_str("</ListBucketResult>");
        x
    }

    #[test]
    fn reads_an_aws_style_reply() {
        let keys = vec![("d/a b+c%.txt".to_string(), 5), ("d/é&<>\"'\tq".to_string(), 0)];
        let page = parse(reply(&keys, &["d/sub/".to_string()], Some("tok/+=")).as_bytes()).unwrap();
        assert_eq!(page.objects.len(), 2);
        assert_eq!(page.objects[0].key, "d/a b+c%.txt");
        assert_eq!(page.objects[0].size, 5);
        assert_eq!(page.objects[0].etag, "\"5\"");
        assert_eq!(page.objects[0].last_modified, SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_428_000));
        assert_eq!(page.objects[1].key, "d/é&<>\"'\tq");
        assert_eq!(page.prefixes, vec!["d/sub/".to_string()]);
        assert_eq!(page.next.as_deref(), Some("tok/+="));
    }

    #[test]
    fn a_complete_listing_has_no_next_page() {
        let page = parse(reply(&[("d/x".to_string(), 1)], &[], None).as_bytes()).unwrap();
        assert_eq!(page.next, None);
        // A token without IsTruncated=true is not followed.
        let x = reply(&[], &[], Some("t")).replace("<IsTruncated>true", "<IsTruncated>false");
        assert_eq!(parse(x.as_bytes()).unwrap().next, None);
    }

    #[test]
    fn reads_cdata_comments_empty_elements_and_namespace_prefixes() {
        let x = r#"<?xml version="1.0"?><!-- listing --><s3:ListBucketResult xmlns:s3="http://s3.amazonaws.com/doc/2006-03-01/">
            <s3:IsTruncated>true</s3:IsTruncated>
            <s3:Contents><s3:Key><![CDATA[d/<raw>&]]>x</s3:Key><s3:Size> 7 </s3:Size><s3:ETag/></s3:Contents>
            <s3:Contents><s3:Key></s3:Key><s3:Size>1</s3:Size></s3:Contents>
            <s3:CommonPrefixes><s3:Prefix>d/&#233;&#x1F600;/</s3:Prefix></s3:CommonPrefixes>
            <s3:NextContinuationToken>n</s3:NextContinuationToken></s3:ListBucketResult>"#;
        let page = parse(x.as_bytes()).unwrap();
        assert_eq!(page.objects.len(), 1, "an object without a key is skipped");
        assert_eq!(page.objects[0].key, "d/<raw>&x");
        assert_eq!(page.objects[0].size, 7);
        assert_eq!(page.objects[0].etag, "");
        assert_eq!(page.prefixes, vec!["d/é😀/".to_string()]);
        assert_eq!(page.next.as_deref(), Some("n"));
    }

    #[test]
    fn an_error_document_is_mapped_like_an_error_reply() {
        let doc = |code: &str| {
            format!("<?xml version=\"1.0\"?><Error><Code>{code}</Code><Message>try &amp; again</Message></Error>")
        };
        match parse(doc("InternalError").as_bytes()) {
            Err(e @ StoreError::Server { .. }) => {
                assert!(e.is_transient());
                assert!(e.to_string().contains("InternalError: try & again"), "{e}");
            }
            other => panic!("{other:?}"),
        }
        assert!(
            matches!(parse(doc("AccessDenied").as_bytes()), Err(StoreError::AccessDenied(c)) if c == "AccessDenied")
        );
        assert!(matches!(parse(doc("NoSuchBucket").as_bytes()), Err(StoreError::NoSuchBucket)));
    }

    #[test]
    fn garbage_is_an_error_not_an_empty_listing() {
        for x in [
            &b""[..],
            b"not xml",
            b"<Other/>",
            b"<ListBucketResult><Contents><Key>a</Key></Contents>",
            b"<ListBucketResult><Contents><Key>a&bogus;</Key></Contents></ListBucketResult>",
            b"<ListBucketResult><Contents><Key>a&amp</Key></Contents></ListBucketResult>",
            b"\xff\xfe",
        ] {
            let e = parse(x).unwrap_err();
            assert!(e.is_transient(), "{:?}: {e}", String::from_utf8_lossy(x));
        }
        let bad_size = reply(&[("d/x".to_string(), 1)], &[], None).replace("<Size>1<", "<Size>one<");
        assert!(parse(bad_size.as_bytes()).is_err());
        let bad_time = reply(&[("d/x".to_string(), 1)], &[], None).replace("2026-11-23T", "yesterday ");
        assert!(parse(bad_time.as_bytes()).is_err());
        assert!(parse(b"<ListBucketResult><Contents><Key>a&#xD800;</Key></Contents></ListBucketResult>").is_err());
        assert!(parse(b"<ListBucketResult><Contents><Key>a&#12a;</Key></Contents></ListBucketResult>").is_err());
    }

    proptest! {
        #[test]
        fn reads_back_what_s3_would_write(
            keys in prop::collection::vec(("\\PC{0,12}", any::<u64>()), 0..20),
            prefixes in prop::collection::vec("\\PC{1,8}/", 0..5),
            token in prop::option::of("[!-~]{1,30}"),
        ) {
            let keys: Vec<(String, u64)> = keys.into_iter().map(|(k, s)| (format!("d/{k}"), s)).collect();
            let page = parse(reply(&keys, &prefixes, token.as_deref()).as_bytes()).unwrap();
            let got: Vec<(String, u64)> = page.objects.iter().map(|o| (o.key.clone(), o.size)).collect();
            prop_assert_eq!(got, keys);
            prop_assert_eq!(page.prefixes, prefixes);
            prop_assert_eq!(page.next, token);
        }
    }
}
