//! Socket options the driver needs: TCP-MD5 (RFC 2385) and the TTL for
//! eBGP multihop.

use std::io;
use std::net::IpAddr;
use std::os::fd::AsRawFd;

/// Sets the TTL (IPv4) or hop limit (IPv6) of a socket.
pub fn set_ttl<S: std::os::fd::AsFd>(sock: &S, ttl: u32, v6: bool) -> io::Result<()> {
    let s = socket2::SockRef::from(sock);
    if v6 {
        s.set_unicast_hops_v6(ttl)
    } else {
        s.set_ttl_v4(ttl)
    }
}

/// Layout of Linux `struct tcp_md5sig` (include/uapi/linux/tcp.h):
/// `sockaddr_storage` (128), flags (1), prefixlen (1), keylen (2),
/// ifindex (4), key (80).
const MD5SIG_LEN: usize = 216;
const MD5SIG_KEYLEN_AT: usize = 130;
const MD5SIG_KEY_AT: usize = 136;
/// TCP_MD5SIG_MAXKEYLEN.
pub const MD5_MAX_KEY_LEN: usize = 80;

/// Builds the `struct tcp_md5sig` bytes for `peer` and `key`.
fn md5sig_bytes(peer: IpAddr, key: &[u8]) -> io::Result<[u8; MD5SIG_LEN]> {
    if key.len() > MD5_MAX_KEY_LEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "TCP-MD5 key is {} bytes, at most {MD5_MAX_KEY_LEN}",
                key.len()
            ),
        ));
    }
    let mut b = [0u8; MD5SIG_LEN];
    match peer {
        IpAddr::V4(a) => {
            // struct sockaddr_in: family (host order), port, address.
            b[0..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
            b[4..8].copy_from_slice(&a.octets());
        }
        IpAddr::V6(a) => {
            // struct sockaddr_in6: family, port, flowinfo, address, scope.
            b[0..2].copy_from_slice(&(libc::AF_INET6 as u16).to_ne_bytes());
            b[8..24].copy_from_slice(&a.octets());
        }
    }
    b[MD5SIG_KEYLEN_AT..MD5SIG_KEYLEN_AT + 2].copy_from_slice(&(key.len() as u16).to_ne_bytes());
    b[MD5SIG_KEY_AT..MD5SIG_KEY_AT + key.len()].copy_from_slice(key);
    Ok(b)
}

/// Enables RFC 2385 TCP-MD5 signatures towards `peer` on a socket (Linux
/// `TCP_MD5SIG`). Must be set before `connect` (or on the listening socket).
///
/// This is the crate's one `unsafe` block: neither socket2 nor nix wraps
/// `TCP_MD5SIG`, so it calls `setsockopt(2)` directly. It is sound because
/// the option value is a plain byte array of exactly the kernel struct's
/// size that lives across the call, and the fd is borrowed from a live
/// socket.
#[allow(unsafe_code)]
pub fn set_tcp_md5sig<S: AsRawFd>(sock: &S, peer: IpAddr, key: &[u8]) -> io::Result<()> {
    let value = md5sig_bytes(peer, key)?;
    // SAFETY: `value` is a valid, initialised buffer of `MD5SIG_LEN` bytes
    // for the duration of the call; the kernel only reads it.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_MD5SIG,
            value.as_ptr().cast::<libc::c_void>(),
            MD5SIG_LEN as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn md5sig_layout() {
        let b = md5sig_bytes("127.0.0.2".parse().unwrap(), b"secret").unwrap();
        assert_eq!(&b[4..8], &[127, 0, 0, 2]);
        assert_eq!(u16::from_ne_bytes([b[130], b[131]]), 6);
        assert_eq!(&b[136..142], b"secret");
        assert!(md5sig_bytes("::1".parse().unwrap(), &[0; 81]).is_err());
    }

    #[test]
    fn md5sig_is_accepted_by_the_kernel() {
        let s = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        set_tcp_md5sig(&s, "127.0.0.1".parse().unwrap(), b"secret").unwrap();
    }
}
