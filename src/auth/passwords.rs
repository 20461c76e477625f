//! Password hashing with argon2id (the crate's defaults: 19 MiB, t=2, p=1; OWASP's baseline).
//!
//! Hashing is CPU- and memory-heavy, and strangers can ask for it (login, register), so it runs
//! through a [`Hasher`]: at most `concurrency` hashes at once on its own threads (about one per
//! core), at most `queue` more callers waiting, and everyone beyond that is refused at once
//! ([`HashError::Busy`], a 429 for the client) instead of taking another 19 MiB.

use argon2::password_hash::{Output, ParamsString, PasswordHash, Salt, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};

/// Hashing threads when `auth.hash_concurrency` is 0: one per core up to this, so a big machine
/// does not dedicate gigabytes to hash buffers.
pub const DEFAULT_MAX_WORKERS: usize = 8;

/// Memory cost (KiB) above which a stored hash is not computed (ours use 19 MiB): a corrupt or
/// foreign row must not make a worker allocate gigabytes.
const MAX_M_COST_KIB: u32 = 256 * 1024;

/// PHC string of `password` with a fresh random salt, computed in `blocks` (grown as needed and
/// kept by the caller, so a worker thread reuses one buffer instead of allocating 19 MiB per
/// hash).
pub fn hash_in(password: &str, blocks: &mut Vec<Block>) -> String {
    let mut raw_salt = [0u8; 16];
    getrandom::fill(&mut raw_salt).expect("the OS random source is available");
    let salt = SaltString::encode_b64(&raw_salt).expect("16 bytes is a valid salt length");
    let params = Params::default();
    let mut out = [0u8; Params::DEFAULT_OUTPUT_LEN];
    ensure_blocks(blocks, params.block_count());
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone())
        .hash_password_into_with_memory(
            password.as_bytes(),
            &raw_salt,
            &mut out,
            &mut blocks[..params.block_count()],
        )
        .expect("argon2 with default params accepts any password up to 4 GiB");
    PasswordHash {
        algorithm: Algorithm::Argon2id.ident(),
        version: Some(Version::V0x13.into()),
        params: ParamsString::try_from(&params).expect("default params encode"),
        salt: Some(Salt::from(&salt)),
        hash: Some(Output::new(&out).expect("32 bytes is a valid output length")),
    }
    .to_string()
}

/// Whether `password` matches the PHC string `phc`, computed in `blocks`. A malformed hash
/// never matches.
pub fn verify_in(password: &str, phc: &str, blocks: &mut Vec<Block>) -> bool {
    let mut check = || -> Option<bool> {
        let hash = PasswordHash::new(phc).ok()?;
        let algorithm = Algorithm::try_from(hash.algorithm).ok()?;
        let version = match hash.version {
            Some(v) => Version::try_from(v).ok()?,
            None => Version::default(),
        };
        let params = Params::try_from(&hash).ok()?;
        if params.m_cost() > MAX_M_COST_KIB {
            return None;
        }
        let expected = hash.hash?;
        let mut salt_buf = [0u8; 64];
        let salt = hash.salt?.decode_b64(&mut salt_buf).ok()?;
        let mut out = vec![0u8; expected.len()];
        let count = params.block_count();
        ensure_blocks(blocks, count);
        Argon2::new(algorithm, version, params)
            .hash_password_into_with_memory(
                password.as_bytes(),
                salt,
                &mut out,
                &mut blocks[..count],
            )
            .ok()?;
        // `Output`'s equality is constant-time.
        Some(Output::new(&out).ok()? == expected)
    };
    check().unwrap_or(false)
}

fn ensure_blocks(blocks: &mut Vec<Block>, count: usize) {
    if blocks.len() < count {
        blocks.resize(count, Block::default());
    }
}

/// [`hash_in`] with a buffer of its own.
pub fn hash(password: &str) -> String {
    hash_in(password, &mut Vec::new())
}

/// [`verify_in`] with a buffer of its own.
pub fn verify(password: &str, phc: &str) -> bool {
    verify_in(password, phc, &mut Vec::new())
}

/// A hash to verify against when the user does not exist, so unknown users cost the same time.
pub fn dummy_hash() -> &'static str {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DUMMY.get_or_init(|| hash("switchboard-dummy-password"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HashError {
    #[error("too many password checks in progress")]
    Busy,
    #[error("the hashing thread failed")]
    Failed,
}

type Work = Box<dyn FnOnce(&mut Vec<Block>) + Send>;

/// Runs password hashes on a fixed set of worker threads with a bounded queue in front.
///
/// Each worker owns one argon2 memory buffer (19 MiB) for its whole life: memory is the number
/// of workers times that, whatever the load. (With a fresh allocation per hash, glibc kept
/// ~200 MiB after a flood of 34 hashes on two threads, and tokio's blocking pool, with its
/// changing threads, ~330 MiB.)
pub struct Hasher {
    queue: std::sync::mpsc::SyncSender<Work>,
}

impl Hasher {
    /// `concurrency` worker threads (0: one per available core, at most [`DEFAULT_MAX_WORKERS`])
    /// and room for `queue` waiting.
    pub fn new(concurrency: usize, queue: usize) -> Self {
        let concurrency = if concurrency == 0 {
            std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .min(DEFAULT_MAX_WORKERS)
        } else {
            concurrency
        };
        let (tx, rx) = std::sync::mpsc::sync_channel::<Work>(queue);
        let rx = std::sync::Arc::new(std::sync::Mutex::new(rx));
        for i in 0..concurrency {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("password-hash-{i}"))
                .spawn(move || {
                    let mut blocks = Vec::new();
                    loop {
                        // The lock is held only to take one job; the hash runs without it.
                        let job = rx.lock().map(|r| r.recv());
                        let Ok(Ok(job)) = job else {
                            return; // the hasher was dropped
                        };
                        // A panic is a bug, but it must not take a worker away for good: its
                        // caller hears `Failed` (the reply sender is dropped) and the worker
                        // goes on with a fresh buffer.
                        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            job(&mut blocks)
                        }));
                        if ran.is_err() {
                            blocks = Vec::new();
                        }
                        // A stored hash with a larger memory cost than ours grew the buffer;
                        // do not keep that for the worker's life.
                        if blocks.len() > Params::DEFAULT_M_COST as usize {
                            blocks = Vec::new();
                        }
                    }
                });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start a password hashing thread");
            }
        }
        Self { queue: tx }
    }

    pub async fn hash(&self, password: String) -> Result<String, HashError> {
        self.run(move |blocks| hash_in(&password, blocks)).await
    }

    pub async fn verify(&self, password: String, phc: String) -> Result<bool, HashError> {
        self.run(move |blocks| verify_in(&password, &phc, blocks))
            .await
    }

    async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Vec<Block>) -> T + Send + 'static,
    ) -> Result<T, HashError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Work = Box::new(move |blocks| {
            metrics::counter!("switchboard_password_hashes_total").increment(1);
            // The caller may have gone away (its client disconnected); the work is done anyway.
            let _ = tx.send(work(blocks));
        });
        self.queue.try_send(job).map_err(|e| match e {
            std::sync::mpsc::TrySendError::Full(_) => {
                metrics::counter!("switchboard_password_hash_refused_total").increment(1);
                HashError::Busy
            }
            std::sync::mpsc::TrySendError::Disconnected(_) => HashError::Failed,
        })?;
        rx.await.map_err(|_| HashError::Failed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_and_verify() {
        let h = super::hash("correct horse");
        assert!(h.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{h}");
        assert!(super::verify("correct horse", &h));
        assert!(!super::verify("wrong horse", &h));
        assert!(!super::verify("x", "not a hash"));
    }

    #[test]
    fn hashes_interoperate_with_the_argon2_crate() {
        use argon2::password_hash::{PasswordHasher, PasswordVerifier};
        // What the crate's own API wrote (the hashes stored before this code) verifies here...
        let salt = SaltString::encode_b64(b"0123456789abcdef").unwrap();
        let theirs = Argon2::default()
            .hash_password(b"pw-1", &salt)
            .unwrap()
            .to_string();
        let mut blocks = Vec::new();
        assert!(verify_in("pw-1", &theirs, &mut blocks));
        assert!(!verify_in("pw-2", &theirs, &mut blocks));
        // ...and what we write verifies there.
        let ours = hash_in("pw-3", &mut blocks);
        let parsed = PasswordHash::new(&ours).unwrap();
        assert!(Argon2::default().verify_password(b"pw-3", &parsed).is_ok());
        // A hash asking for absurd memory is refused, not computed.
        let greedy = theirs.replace("m=19456", "m=4000000");
        assert!(!verify_in("pw-1", &greedy, &mut blocks));
        assert_eq!(
            blocks.len(),
            Params::DEFAULT_M_COST as usize,
            "one buffer, reused"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_queue_refuses_at_once() {
        let hasher = std::sync::Arc::new(Hasher::new(1, 1));
        let phc = super::hash("pw");
        let mut tasks = Vec::new();
        for _ in 0..6 {
            let (h, phc) = (hasher.clone(), phc.clone());
            tasks.push(tokio::spawn(
                async move { h.verify("pw".into(), phc).await },
            ));
        }
        let mut results = Vec::new();
        for t in tasks {
            results.push(t.await.unwrap());
        }
        let ok = results.iter().filter(|r| **r == Ok(true)).count();
        let busy = results
            .iter()
            .filter(|r| **r == Err(HashError::Busy))
            .count();
        assert_eq!(ok + busy, 6);
        assert!(
            (1..=2).contains(&ok),
            "one running and one waiting at most: {ok}"
        );
    }
}
