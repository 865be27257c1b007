//! The SYN a listener accepted, as the kernel saved it (`TCP_SAVE_SYN`),
//! and the attribution stamp among its TCP options.
//!
//! The stamp is what ties an accepted connection to the kernel's record of
//! who opened it; this module only finds it. Whether it is genuine (MAC,
//! record, 4-tuple) is `attribution`'s call.

use std::{io, os::fd::AsRawFd};

use agent_ebpf::{STAMP_OPTION_LEN, Stamp};

/// IP and TCP headers of a SYN, with their options, fit in this many bytes
/// (a longer one is refused by the kernel with EINVAL and goes
/// unattributed). IPv6 extension headers are not walked: a SYN carrying
/// them has no stamp to find, so it goes unattributed too.
const SAVED_SYN_MAX: usize = 512;

/// What the kernel kept of an accepted connection's SYN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SavedSyn {
    /// Nothing: a SYN cookie answered it (the listener's queue was full),
    /// or the listener does not save SYNs.
    Missing,
    /// The SYN, and the stamp in it if it had one.
    Kept(Option<Stamp>),
}
const IPPROTO_TCP: u8 = 6;

/// Asks the kernel to keep the SYN of every connection accepted on
/// `listener` (inherited by the accepted sockets, read once each).
pub fn save_syns(listener: &impl AsRawFd) -> io::Result<()> {
    crate::sockopt::set(listener, libc::IPPROTO_TCP, libc::TCP_SAVE_SYN, 1)
}

/// Whether `listener` keeps its connections' SYNs (so there is one to read).
pub fn saves_syns(listener: &impl AsRawFd) -> bool {
    crate::sockopt::get(listener, libc::IPPROTO_TCP, libc::TCP_SAVE_SYN).is_ok_and(|on| on != 0)
}

/// The SYN saved for an accepted `stream`. The kernel hands it out once; a
/// second call finds nothing.
pub fn saved_syn(stream: &impl AsRawFd) -> io::Result<SavedSyn> {
    let mut buf = [0u8; SAVED_SYN_MAX];
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: getsockopt into a buffer of the given length.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_SAVED_SYN,
            buf.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // Nothing saved (a SYN cookie answered, the listener does not save
    // SYNs, or it was already read): the kernel succeeds with length 0.
    match (len as usize).min(buf.len()) {
        0 => Ok(SavedSyn::Missing),
        len => Ok(SavedSyn::Kept(stamp_in_syn(&buf[..len]))),
    }
}

/// Finds the stamp in a saved SYN (IPv4 or IPv6 header, then TCP). Total
/// over any input: malformed headers or options mean no stamp.
pub fn stamp_in_syn(syn: &[u8]) -> Option<Stamp> {
    let tcp = match syn.first()? >> 4 {
        4 => {
            let ihl = usize::from(syn[0] & 0x0f) * 4;
            (ihl >= 20 && *syn.get(9)? == IPPROTO_TCP).then_some(())?;
            syn.get(ihl..)?
        }
        6 => {
            (*syn.get(6)? == IPPROTO_TCP).then_some(())?;
            syn.get(40..)?
        }
        _ => return None,
    };
    let data_offset = usize::from(tcp.get(12)? >> 4) * 4;
    let options = tcp.get(20..data_offset)?;
    stamp_in_options(options)
}

/// Walks TCP options (RFC 9293 §3.1): the first stamp found, if any.
pub fn stamp_in_options(mut options: &[u8]) -> Option<Stamp> {
    loop {
        match *options.first()? {
            0 => return None,
            1 => options = &options[1..],
            _ => {
                let len = usize::from(*options.get(1)?);
                if len < 2 {
                    return None;
                }
                let option = options.get(..len)?;
                if len == STAMP_OPTION_LEN
                    && let Some(stamp) = Stamp::from_option(option)
                {
                    return Some(stamp);
                }
                options = &options[len..];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAMP: Stamp = Stamp {
        id: 0x1122_3344_5566_7788,
        mac: 0x99aa_bbcc_ddee_ff00,
    };

    /// A TCP header (20 bytes + `options`, padded to a multiple of 4).
    fn tcp(options: &[u8]) -> Vec<u8> {
        let mut opts = options.to_vec();
        while !opts.len().is_multiple_of(4) {
            opts.push(0);
        }
        let mut header = vec![0u8; 20];
        header[12] = (((20 + opts.len()) / 4) as u8) << 4;
        header[13] = 0x02;
        header.extend(opts);
        header
    }

    fn ipv4(tcp: &[u8]) -> Vec<u8> {
        let mut ip = vec![0u8; 20];
        ip[0] = 0x45;
        ip[9] = IPPROTO_TCP;
        ip.extend_from_slice(tcp);
        ip
    }

    fn ipv6(tcp: &[u8]) -> Vec<u8> {
        let mut ip = vec![0u8; 40];
        ip[0] = 0x60;
        ip[6] = IPPROTO_TCP;
        ip.extend_from_slice(tcp);
        ip
    }

    /// Linux's usual SYN options, then ours: 40 bytes, the TCP maximum.
    fn linux_syn_options() -> Vec<u8> {
        let mut o = vec![
            2, 4, 0x05, 0xb4, 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 7,
        ];
        o.extend_from_slice(&STAMP.to_option());
        o
    }

    #[test]
    fn finds_the_stamp_or_nothing() {
        let mut other_exid = STAMP.to_option();
        other_exid[2] = 0;
        let cases: Vec<(&str, Vec<u8>, Option<Stamp>)> = vec![
            (
                "IPv4, full option space",
                ipv4(&tcp(&linux_syn_options())),
                Some(STAMP),
            ),
            (
                "IPv6, full option space",
                ipv6(&tcp(&linux_syn_options())),
                Some(STAMP),
            ),
            (
                "IPv4, stamp alone",
                ipv4(&tcp(&STAMP.to_option())),
                Some(STAMP),
            ),
            ("no options", ipv4(&tcp(&[])), None),
            (
                "usual options only",
                ipv4(&tcp(&[2, 4, 5, 0xb4, 1, 1, 4, 2])),
                None,
            ),
            ("another experiment", ipv4(&tcp(&other_exid)), None),
            (
                "after end of options",
                ipv4(&tcp(&[0, 0, 0, 0]
                    .iter()
                    .copied()
                    .chain(STAMP.to_option())
                    .collect::<Vec<_>>())),
                None,
            ),
            ("zero-length option", ipv4(&tcp(&[5, 0, 1, 1])), None),
            (
                "truncated stamp",
                ipv4(&tcp(&STAMP.to_option()[..12])),
                None,
            ),
            (
                "UDP",
                {
                    let mut p = ipv4(&tcp(&STAMP.to_option()));
                    p[9] = 17;
                    p
                },
                None,
            ),
            ("not IP", vec![0x00; 80], None),
            ("empty", vec![], None),
        ];
        for (what, syn, expected) in cases {
            assert_eq!(stamp_in_syn(&syn), expected, "{what}");
        }
    }

    #[test]
    fn data_offset_past_the_end_is_no_stamp() {
        let mut syn = ipv4(&tcp(&STAMP.to_option()));
        syn[20 + 12] = 0xf0;
        assert_eq!(stamp_in_syn(&syn), None);
        for cut in 0..syn.len() {
            let _ = stamp_in_syn(&syn[..cut]);
        }
    }

    /// What the kernel answers on loopback: the SYN once where the listener
    /// saves SYNs; nothing (length 0, not an error) where it does not, or
    /// on a second read — the case SYN cookies produce.
    #[test]
    fn the_kernel_hands_a_saved_syn_out_once() {
        for save in [true, false] {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            if save {
                save_syns(&listener).unwrap();
            }
            assert_eq!(saves_syns(&listener), save);
            let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let (accepted, _) = listener.accept().unwrap();
            let first = saved_syn(&accepted).unwrap();
            assert_eq!(matches!(first, SavedSyn::Kept(None)), save, "{save}");
            assert_eq!(saved_syn(&accepted).unwrap(), SavedSyn::Missing);
        }
    }
}
