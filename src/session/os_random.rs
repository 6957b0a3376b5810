//! Randomness for tokens, session ids and nonces: bytes of the OS CSPRNG (DESIGN.md §3), fetched
//! in blocks. `OsRng` makes one `getrandom` syscall per call, and a login or refresh needs five
//! (two 32-byte secrets, up to three nonces, a session id): fetching 4 KiB at a time makes that
//! one syscall per few dozen logins. Every byte handed out still comes straight from the kernel
//! (no userspace generator in between), and is wiped from the buffer once handed out.

use rand::RngCore;
use rand::rngs::OsRng;

const BLOCK: usize = 4096;

/// The OS CSPRNG, read a block at a time.
pub struct OsRandom {
    buf: Box<[u8; BLOCK]>,
    /// Bytes before `pos` were handed out (and zeroed); those from `pos` on are unread.
    pos: usize,
}

impl Default for OsRandom {
    fn default() -> Self {
        OsRandom {
            buf: Box::new([0; BLOCK]),
            pos: BLOCK,
        }
    }
}

impl OsRandom {
    pub fn new() -> Self {
        Self::default()
    }

    fn take(&mut self, out: &mut [u8]) -> Result<(), rand::Error> {
        let mut done = 0;
        while done < out.len() {
            if self.pos == BLOCK {
                OsRng.try_fill_bytes(&mut self.buf[..])?;
                self.pos = 0;
            }
            let n = (out.len() - done).min(BLOCK - self.pos);
            let src = &mut self.buf[self.pos..self.pos + n];
            out[done..done + n].copy_from_slice(src);
            // What was handed out (secrets, nonces) does not linger in the buffer.
            src.fill(0);
            self.pos += n;
            done += n;
        }
        Ok(())
    }
}

impl RngCore for OsRandom {
    fn next_u32(&mut self) -> u32 {
        let mut b = [0; 4];
        self.fill_bytes(&mut b);
        u32::from_le_bytes(b)
    }

    fn next_u64(&mut self) -> u64 {
        let mut b = [0; 8];
        self.fill_bytes(&mut b);
        u64::from_le_bytes(b)
    }

    fn fill_bytes(&mut self, dest: &mut [u8]) {
        // As OsRng: an OS without randomness is not one the proxy can run on.
        if let Err(e) = self.take(dest) {
            panic!("the OS random number generator failed: {e}");
        }
    }

    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand::Error> {
        self.take(dest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hands_out_each_byte_once_and_wipes_it() {
        let mut r = OsRandom::new();
        let mut seen = std::collections::HashSet::new();
        // Across several blocks, odd sizes straddling block ends.
        for _ in 0..1000 {
            let mut b = [0u8; 37];
            r.fill_bytes(&mut b);
            assert_ne!(b, [0u8; 37]);
            assert!(seen.insert(b), "a 37-byte draw repeated");
            assert!(r.buf[..r.pos].iter().all(|&x| x == 0));
        }
        let mut big = vec![0u8; 3 * BLOCK + 5];
        r.fill_bytes(&mut big);
        // 296 bits of entropy per 37 bytes: all-zero windows would mean unfilled output.
        assert!(big.chunks(37).all(|c| c.iter().any(|&x| x != 0)));
        assert_ne!(r.next_u64(), r.next_u64());
    }
}
