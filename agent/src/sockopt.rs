//! Integer socket options the standard library and tokio do not expose
//! (`TCP_SAVE_SYN`, `TCP_USER_TIMEOUT`, the 64-bit cookies).

use std::{io, os::fd::AsRawFd};

/// `setsockopt(level, name, value)` for an integer option.
pub fn set(
    socket: &impl AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: setsockopt with a valid int on an open socket.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&raw const value).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `getsockopt(level, name)` for an integer option.
pub fn get(
    socket: &impl AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
) -> io::Result<libc::c_int> {
    get_value(socket, level, name)
}

/// `getsockopt(level, name)` for a 64-bit option (`SO_COOKIE`,
/// `SO_NETNS_COOKIE`).
pub fn get_u64(socket: &impl AsRawFd, level: libc::c_int, name: libc::c_int) -> io::Result<u64> {
    get_value(socket, level, name)
}

/// Integers only: any bit pattern the kernel writes is a value.
fn get_value<T: Default>(
    socket: &impl AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
) -> io::Result<T> {
    let mut value = T::default();
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: getsockopt into a value of the given length on an open socket.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&raw mut value).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(value)
    } else {
        Err(io::Error::last_os_error())
    }
}
