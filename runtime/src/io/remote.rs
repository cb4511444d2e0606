//! S3-compatible object storage underneath Delta tables, Parquet folders and file sources:
//! the client (from an output's or source's `storage` and the AWS environment), and the
//! listing, download and upload weir does itself. object_store's futures run to their end
//! on a thread and runtime of their own ([`block_on`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::Remote;

type Res<T> = Result<T, String>;

/// The S3 client of a remote table: endpoint, region, path style and credentials as the
/// output says, the rest (and credentials it does not name) from the AWS environment.
pub(crate) fn s3_store(r: &Remote) -> Res<Arc<dyn delta_kernel::object_store::ObjectStore>> {
    use delta_kernel::object_store::aws::AmazonS3Builder;
    let mut b = AmazonS3Builder::from_env().with_url(r.url.as_str());
    if let Some(e) = &r.endpoint {
        b = b.with_endpoint(e.as_str());
    }
    if let Some(region) = &r.region {
        b = b.with_region(region.as_str());
    }
    if let Some(p) = r.path_style {
        b = b.with_virtual_hosted_style_request(!p);
    }
    if let Some(h) = r.allow_http {
        b = b.with_allow_http(h);
    }
    let text = |s: &crate::config::SecretRef, what: &str| -> Res<String> {
        let bytes = s.resolve().map_err(|e| format!("the {what} of {}: {e}", r.url))?;
        String::from_utf8(bytes).map_err(|_| format!("the {what} of {} is not UTF-8 text", r.url))
    };
    if let Some(k) = &r.access_key_id {
        b = b.with_access_key_id(text(k, "access key id")?);
    }
    if let Some(k) = &r.secret_access_key {
        b = b.with_secret_access_key(text(k, "secret access key")?);
    }
    Ok(Arc::new(b.build().map_err(|e| format!("cannot reach {}: {e}", r.url))?))
}

/// Run object-store I/O to its end on a thread and runtime of its own (the caller may be
/// on a runtime's thread already, where blocking on another is refused).
pub(crate) fn block_on<T: Send>(f: futures::future::BoxFuture<'_, T>) -> Res<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| format!("cannot start the I/O runtime: {e}"))?;
            Ok(rt.block_on(f))
        })
        .join()
        .map_err(|_| "internal error (a bug in weir, please report it): the object-store thread panicked".to_string())?
    })
}

/// The object path of `rel` under a remote table's URL.
pub(crate) fn object_path(url: &url::Url, rel: &str) -> Res<delta_kernel::object_store::path::Path> {
    let key = format!("{}{rel}", url.path().trim_start_matches('/'));
    delta_kernel::object_store::path::Path::parse(&key).map_err(|e| format!("{url}{rel}: {e}"))
}

/// Download the object at `key` (under the remote's URL) to `to`, streamed.
pub(crate) fn download(r: &Remote, key: &str, to: &Path) -> Res<()> {
    use delta_kernel::object_store::ObjectStoreExt;
    use std::io::Write;
    let store = s3_store(r)?;
    let url = url::Url::parse(&r.url).map_err(|e| format!("{}: {e}", r.url))?;
    let from = object_path(&url, key)?;
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent).map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    }
    let name = format!("{}{key}", r.url);
    let to_owned = to.to_path_buf();
    block_on(Box::pin(async move {
        use futures::StreamExt;
        let got = store.get(&from).await.map_err(|e| format!("cannot download {name}: {e}"))?;
        let mut file = std::fs::File::create(&to_owned).map_err(|e| format!("{}: {e}", to_owned.display()))?;
        let mut stream = got.into_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| format!("cannot download {name}: {e}"))?;
            file.write_all(&chunk).map_err(|e| format!("{}: {e}", to_owned.display()))?;
        }
        Ok(())
    }))?
}

/// What a multipart upload sends at a time.
const PART_BYTES: usize = 16 << 20;

/// Upload local files to their keys under a remote's URL, `(local file, key under the URL)`
/// (again after a crash: the keys are a run's own and nothing references them yet). Files
/// larger than one part go up in parts; a failed upload is aborted, so nothing but whole
/// files is ever left.
pub(crate) fn upload(r: &Remote, files: &[(PathBuf, String)]) -> Res<()> {
    use delta_kernel::object_store::{ObjectStoreExt, PutPayload, WriteMultipart};
    use std::io::Read;
    let store = s3_store(r)?;
    let url = url::Url::parse(&r.url).map_err(|e| format!("{}: {e}", r.url))?;
    let mut jobs = Vec::new();
    for (local, key) in files {
        jobs.push((local.clone(), object_path(&url, key)?, format!("{url}{key}")));
    }
    let result = block_on(Box::pin(async move {
        for (from, to, name) in jobs {
            let mut f = std::fs::File::open(&from).map_err(|e| format!("{}: {e}", from.display()))?;
            let len = f.metadata().map_err(|e| format!("{}: {e}", from.display()))?.len() as usize;
            if len <= PART_BYTES {
                let mut buf = Vec::with_capacity(len);
                f.read_to_end(&mut buf).map_err(|e| format!("{}: {e}", from.display()))?;
                store.put(&to, PutPayload::from(buf)).await.map_err(|e| format!("cannot upload {name}: {e}"))?;
                continue;
            }
            let upload = store.put_multipart(&to).await.map_err(|e| format!("cannot upload {name}: {e}"))?;
            let mut w = WriteMultipart::new_with_chunk_size(upload, PART_BYTES);
            let mut buf = vec![0u8; PART_BYTES];
            loop {
                let n = f.read(&mut buf).map_err(|e| format!("{}: {e}", from.display()))?;
                if n == 0 {
                    break;
                }
                w.wait_for_capacity(4).await.map_err(|e| format!("cannot upload {name}: {e}"))?;
                w.write(&buf[..n]);
            }
            if let Err(e) = w.finish().await {
                return Err(format!("cannot upload {name}: {e}"));
            }
        }
        Ok(())
    }))?;
    result
}

/// Every object under `prefix` (a key prefix under the remote's URL; empty: all of it).
pub(crate) fn list(r: &Remote, prefix: &str) -> Res<Vec<delta_kernel::object_store::ObjectMeta>> {
    use futures::TryStreamExt;
    let url = url::Url::parse(&r.url).map_err(|e| format!("{}: {e}", r.url))?;
    let store = s3_store(r)?;
    let at = object_path(&url, prefix)?;
    let name = format!("{}{prefix}", r.url);
    let whole = url.path().trim_matches('/').is_empty() && prefix.is_empty();
    block_on(Box::pin(async move {
        let s = if whole { store.list(None) } else { store.list(Some(&at)) };
        s.try_collect().await.map_err(|e| format!("cannot list {name}: {e}"))
    }))?
}

/// A short tag of a writer's id (`weir/PIPELINE/STEP`) in the names of the files it puts
/// beside other writers' (`part-00000-r7-<TAG>.parquet`).
pub(crate) fn writer_tag(writer: &str) -> String {
    use sha2::Digest;
    let h = sha2::Sha256::digest(writer.as_bytes());
    h[..4].iter().map(|b| format!("{b:02x}")).collect()
}
