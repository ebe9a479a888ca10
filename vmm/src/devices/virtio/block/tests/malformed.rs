//! Every kind of malformed chain gets one clear outcome (an error status where the status byte
//! can be found, else the chain returned unanswered), and the next good request still works.

use super::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Used entry with length 1 and this status byte.
    Status(u8),
    /// Used entry with length 0; the status byte untouched.
    Dropped,
    /// No used entry at all (the head itself was unusable).
    Ignored,
}

/// Disk of 128 sectors.
const SECTORS: u64 = 128;
const END: u64 = MEM_SIZE as u64;

fn chain(f: &mut Fixture, t: u32, sector: u64, bufs: &[Buf]) -> u16 {
    f.header(t, sector);
    f.q.add_chain(&f.mem, bufs).unwrap()
}

fn raw(f: &mut Fixture, head: u16, descs: &[(u16, RawDesc)]) -> u16 {
    f.header(VIRTIO_BLK_T_IN, 0);
    for (i, d) in descs {
        f.q.set_desc(&f.mem, *i, *d).unwrap();
    }
    f.q.publish(&f.mem, head).unwrap();
    head
}

type Build = fn(&mut Fixture) -> u16;

fn cases() -> Vec<(&'static str, Build, Outcome)> {
    use Outcome::*;
    vec![
        (
            "read into a device-readable buffer",
            |f| {
                chain(
                    f,
                    VIRTIO_BLK_T_IN,
                    0,
                    &[Buf::r(HDR, 16), Buf::r(DATA, 512), Buf::w(STATUS, 1)],
                )
            },
            Status(IOERR),
        ),
        (
            "write from a device-writable buffer",
            |f| {
                chain(
                    f,
                    VIRTIO_BLK_T_OUT,
                    0,
                    &[Buf::r(HDR, 16), Buf::w(DATA, 512), Buf::w(STATUS, 1)],
                )
            },
            Status(IOERR),
        ),
        (
            "readable buffer after a writable one",
            |f| {
                let b = [
                    Buf::r(HDR, 16),
                    Buf::w(DATA, 512),
                    Buf::r(DATA + 4096, 512),
                    Buf::w(STATUS, 1),
                ];
                chain(f, VIRTIO_BLK_T_IN, 0, &b)
            },
            Status(IOERR),
        ),
        (
            "read length not a multiple of 512",
            |f| {
                chain(
                    f,
                    VIRTIO_BLK_T_IN,
                    0,
                    &[Buf::r(HDR, 16), Buf::w(DATA, 500), Buf::w(STATUS, 1)],
                )
            },
            Status(IOERR),
        ),
        (
            "write length not a multiple of 512",
            |f| {
                chain(
                    f,
                    VIRTIO_BLK_T_OUT,
                    0,
                    &[Buf::r(HDR, 16), Buf::r(DATA, 513), Buf::w(STATUS, 1)],
                )
            },
            Status(IOERR),
        ),
        (
            "sector + length overflows u64",
            |f| {
                chain(
                    f,
                    VIRTIO_BLK_T_IN,
                    u64::MAX,
                    &[Buf::r(HDR, 16), Buf::w(DATA, 512), Buf::w(STATUS, 1)],
                )
            },
            Status(IOERR),
        ),
        (
            "sector whose byte offset overflows u64",
            |f| {
                chain(
                    f,
                    VIRTIO_BLK_T_OUT,
                    1 << 60,
                    &[Buf::r(HDR, 16), Buf::r(DATA, 512), Buf::w(STATUS, 1)],
                )
            },
            Status(IOERR),
        ),
        (
            "read ending one sector past the disk",
            |f| {
                chain(
                    f,
                    VIRTIO_BLK_T_IN,
                    SECTORS - 1,
                    &[Buf::r(HDR, 16), Buf::w(DATA, 1024), Buf::w(STATUS, 1)],
                )
            },
            Status(IOERR),
        ),
        (
            "write starting past the disk",
            |f| {
                chain(
                    f,
                    VIRTIO_BLK_T_OUT,
                    SECTORS,
                    &[Buf::r(HDR, 16), Buf::r(DATA, 512), Buf::w(STATUS, 1)],
                )
            },
            Status(IOERR),
        ),
        (
            "status buffer device-readable",
            |f| {
                chain(
                    f,
                    VIRTIO_BLK_T_IN,
                    0,
                    &[Buf::r(HDR, 16), Buf::w(DATA, 512), Buf::r(STATUS, 1)],
                )
            },
            Dropped,
        ),
        (
            "status buffer of length 0",
            |f| {
                chain(
                    f,
                    VIRTIO_BLK_T_IN,
                    0,
                    &[Buf::r(HDR, 16), Buf::w(DATA, 512), Buf::w(STATUS, 0)],
                )
            },
            Dropped,
        ),
        (
            "status byte outside guest memory",
            |f| {
                chain(
                    f,
                    VIRTIO_BLK_T_IN,
                    0,
                    &[Buf::r(HDR, 16), Buf::w(DATA, 512), Buf::w(END + 10, 1)],
                )
            },
            Dropped,
        ),
        (
            "header shorter than 16 bytes",
            |f| chain(f, VIRTIO_BLK_T_IN, 0, &[Buf::r(HDR, 8), Buf::w(STATUS, 1)]),
            Status(IOERR),
        ),
        (
            "no header at all",
            |f| chain(f, VIRTIO_BLK_T_IN, 0, &[Buf::w(STATUS, 1)]),
            Status(IOERR),
        ),
        (
            "header outside guest memory",
            |f| {
                chain(
                    f,
                    VIRTIO_BLK_T_IN,
                    0,
                    &[Buf::r(1 << 40, 16), Buf::w(DATA, 512), Buf::w(STATUS, 1)],
                )
            },
            Status(IOERR),
        ),
        (
            "data running off the end of guest memory",
            |f| {
                chain(
                    f,
                    VIRTIO_BLK_T_IN,
                    0,
                    &[Buf::r(HDR, 16), Buf::w(END - 256, 512), Buf::w(STATUS, 1)],
                )
            },
            Status(IOERR),
        ),
        (
            "data address wrapping around u64",
            |f| {
                chain(
                    f,
                    VIRTIO_BLK_T_IN,
                    0,
                    &[
                        Buf::r(HDR, 16),
                        Buf::w(u64::MAX - 100, 512),
                        Buf::w(STATUS, 1),
                    ],
                )
            },
            Status(IOERR),
        ),
        (
            "descriptor larger than SIZE_MAX",
            |f| {
                chain(
                    f,
                    VIRTIO_BLK_T_IN,
                    0,
                    &[Buf::r(HDR, 16), Buf::w(DATA, 2 << 20), Buf::w(STATUS, 1)],
                )
            },
            Status(IOERR),
        ),
        (
            "flush carrying data",
            |f| {
                chain(
                    f,
                    VIRTIO_BLK_T_FLUSH,
                    0,
                    &[Buf::r(HDR, 16), Buf::r(DATA, 512), Buf::w(STATUS, 1)],
                )
            },
            Status(IOERR),
        ),
        (
            "get-id without a buffer",
            |f| {
                chain(
                    f,
                    VIRTIO_BLK_T_GET_ID,
                    0,
                    &[Buf::r(HDR, 16), Buf::w(STATUS, 1)],
                )
            },
            Status(IOERR),
        ),
        (
            "chain looping on itself",
            |f| {
                let d = |next| RawDesc {
                    addr: HDR,
                    len: 16,
                    flags: VRING_DESC_F_NEXT,
                    next,
                };
                raw(f, 200, &[(200, d(201)), (201, d(200))])
            },
            Dropped,
        ),
        (
            "next index past the queue",
            |f| {
                let hdr = RawDesc {
                    addr: HDR,
                    len: 16,
                    flags: VRING_DESC_F_NEXT,
                    next: 999,
                };
                raw(f, 210, &[(210, hdr)])
            },
            Dropped,
        ),
        (
            "indirect table outside guest memory",
            |f| {
                let d = RawDesc {
                    addr: END + 4096,
                    len: 64,
                    flags: VRING_DESC_F_INDIRECT,
                    next: 0,
                };
                raw(f, 220, &[(220, d)])
            },
            Dropped,
        ),
        (
            "indirect table inside an indirect table",
            |f| {
                let table = 0x90000;
                let inner = SplitQueue::new(GuestAddress(table), 4);
                let nested = RawDesc {
                    addr: table,
                    len: 64,
                    flags: VRING_DESC_F_INDIRECT,
                    next: 0,
                };
                inner.set_desc(&f.mem, 0, nested).unwrap();
                raw(
                    f,
                    230,
                    &[(
                        230,
                        RawDesc {
                            addr: table,
                            len: 64,
                            flags: VRING_DESC_F_INDIRECT,
                            next: 0,
                        },
                    )],
                )
            },
            Dropped,
        ),
        (
            "head index past the queue",
            |f| {
                f.q.publish(&f.mem, 4000).unwrap();
                4000
            },
            Ignored,
        ),
    ]
}

#[test]
fn each_malformed_chain_gets_one_clear_outcome_and_the_device_keeps_serving() {
    let content = pattern(SECTORS as usize * 512);
    let mut f = Fixture::new(&content, false);
    for (name, build, want) in cases() {
        f.reset_status();
        let before = f.q.used_idx(&f.mem).unwrap();
        let head = build(&mut f);
        f.notify();
        let after = f.q.used_idx(&f.mem).unwrap();
        let got = if after == before {
            Outcome::Ignored
        } else {
            assert_eq!(after, before.wrapping_add(1), "{name}: one used entry");
            let (id, len) = f.q.used_elem(&f.mem, before).unwrap();
            assert_eq!(id, u32::from(head), "{name}: used entry names the head");
            match len {
                0 => {
                    assert_eq!(f.status(), 0xff, "{name}: dropped chain's status untouched");
                    Outcome::Dropped
                }
                1 => Outcome::Status(f.status()),
                other => panic!("{name}: unexpected used length {other}"),
            }
        };
        assert_eq!(got, want, "{name}");
        let (st, _, data) = f.read(SECTORS - 1, 1);
        assert_eq!(
            (st, &data[..]),
            (OK, &content[content.len() - 512..]),
            "after {name}"
        );
    }
    assert_eq!(
        std::fs::read(&f.path).unwrap(),
        content,
        "no malformed request wrote anything"
    );
}

#[test]
fn avail_index_running_ahead_of_the_queue_is_ignored_without_panic() {
    let content = pattern(SECTORS as usize * 512);
    let mut f = Fixture::new(&content, false);
    let used = f.q.used_idx(&f.mem).unwrap();
    f.q.set_avail_idx(&f.mem, 1000).unwrap();
    f.notify();
    assert_eq!(f.q.used_idx(&f.mem).unwrap(), used);
    // A driver that puts its index back is served again.
    f.q.set_avail_idx(&f.mem, 0).unwrap();
    let (st, _, data) = f.read(0, 1);
    assert_eq!((st, &data[..]), (OK, &content[..512]));
}

#[test]
fn the_last_sector_is_in_range() {
    let content = pattern(SECTORS as usize * 512 + 100);
    let mut f = Fixture::new(&content, false);
    // The trailing 100 bytes are not a whole sector: invisible to the guest.
    let (st, _, data) = f.read(SECTORS - 1, 1);
    assert_eq!(
        (st, &data[..]),
        (
            OK,
            &content[(SECTORS as usize - 1) * 512..SECTORS as usize * 512]
        )
    );
    let (st, _, _) = f.read(SECTORS, 1);
    assert_eq!(st, IOERR);
}
