"""This machine's network interfaces and their addresses (``getifaddrs(3)``), for binding to what a rank table
names.

A rank table names each rank's host by address. An Agent must listen where its peers look for it: gloo and
NCCL bind to a network *interface*, and pick one from the hostname by default. On a host with several networks,
or in a network namespace, that is the wrong one. `interface_of` finds the interface that holds the rank
table's address, and `not_local_message` says what went wrong when no interface holds it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import ipaddress
import os
import socket


class _SockAddr(ctypes.Structure):
    _fields_ = [("sa_family", ctypes.c_ushort), ("sa_data", ctypes.c_ubyte * 14)]


class _SockAddrIn(ctypes.Structure):
    _fields_ = [("sin_family", ctypes.c_ushort), ("sin_port", ctypes.c_uint16), ("sin_addr", ctypes.c_ubyte * 4),
                ("sin_zero", ctypes.c_ubyte * 8)]


class _SockAddrIn6(ctypes.Structure):
    _fields_ = [("sin6_family", ctypes.c_ushort), ("sin6_port", ctypes.c_uint16), ("sin6_flowinfo", ctypes.c_uint32),
                ("sin6_addr", ctypes.c_ubyte * 16), ("sin6_scope_id", ctypes.c_uint32)]


class _IfAddrs(ctypes.Structure):
    pass


_IfAddrs._fields_ = [("ifa_next", ctypes.POINTER(_IfAddrs)), ("ifa_name", ctypes.c_char_p),
                     ("ifa_flags", ctypes.c_uint), ("ifa_addr", ctypes.POINTER(_SockAddr)),
                     ("ifa_netmask", ctypes.POINTER(_SockAddr)), ("ifa_ifu", ctypes.POINTER(_SockAddr)),
                     ("ifa_data", ctypes.c_void_p)]


def interface_addresses() -> list[tuple[str, str]]:
    """(interface name, address) for every IPv4 and IPv6 address of this machine (of this process's network
    namespace), in the kernel's order. IPv4 names are the address labels (``eth0``, or an alias ``eth0:1``), as
    gloo matches them."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    head = ctypes.POINTER(_IfAddrs)()
    if libc.getifaddrs(ctypes.byref(head)) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"getifaddrs failed: {os.strerror(errno)}")
    out: list[tuple[str, str]] = []
    try:
        node = head
        while node:
            entry = node.contents
            addr = entry.ifa_addr
            if addr and entry.ifa_name:
                family = addr.contents.sa_family
                if family == socket.AF_INET:
                    raw = bytes(ctypes.cast(addr, ctypes.POINTER(_SockAddrIn)).contents.sin_addr)
                    out.append((entry.ifa_name.decode(), socket.inet_ntop(socket.AF_INET, raw)))
                elif family == socket.AF_INET6:
                    raw = bytes(ctypes.cast(addr, ctypes.POINTER(_SockAddrIn6)).contents.sin6_addr)
                    out.append((entry.ifa_name.decode(), socket.inet_ntop(socket.AF_INET6, raw)))
            node = entry.ifa_next
    finally:
        libc.freeifaddrs(head)
    return out


def local_addresses() -> list[str]:
    """Every address of this machine, each once, in the kernel's order."""
    return list(dict.fromkeys(address for _, address in interface_addresses()))


def resolve(host: str) -> str:
    """``host`` as an IP address: itself when it is one, else its first address (``getaddrinfo``); unchanged
    when it does not resolve."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        return str(socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][4][0])
    except (OSError, IndexError):
        return host


def interface_of(host: str) -> str | None:
    """The interface that holds ``host`` (an address, or a name resolved first), or None when none does."""
    address = resolve(host)
    try:
        wanted = ipaddress.ip_address(address)
    except ValueError:
        return None
    for name, addr in interface_addresses():
        try:
            if ipaddress.ip_address(addr.split("%")[0]) == wanted:
                return name
        except ValueError:
            continue
    return None


def not_local_message(host: str, what: str) -> str:
    """The error for a rank table address this machine does not hold: names it and the machine's addresses."""
    shown = host if resolve(host) == host else f"{host} ({resolve(host)})"
    return (f"{what} '{shown}' is not an address of this machine (host '{socket.gethostname()}', addresses: "
            f"{', '.join(local_addresses()) or 'none'}); start these ranks on the host that holds it, or fix the "
            f"rank table")
