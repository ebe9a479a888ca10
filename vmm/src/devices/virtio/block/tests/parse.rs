//! `parse()` alone, on plain guest memory: the exact typed request or refusal for each shape,
//! with nothing written to guest memory and no disk involved.

use virtio_queue::desc::split::Descriptor;

use super::*;
use request::{RequestError as E, MAX_DESCRIPTORS, SIZE_MAX};

const CAP: u64 = 100;

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
}

fn r(addr: u64, len: u32) -> Descriptor {
    Descriptor::new(addr, len, VRING_DESC_F_NEXT, 0)
}

fn w(addr: u64, len: u32) -> Descriptor {
    Descriptor::new(addr, len, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 0)
}

/// The chain as virtio-queue yields it: NEXT set on all but the last descriptor.
fn chain(mut descs: Vec<Descriptor>) -> Vec<Descriptor> {
    if let Some(last) = descs.last_mut() {
        let flags = last.flags() & !VRING_DESC_F_NEXT;
        *last = Descriptor::new(last.addr().0, last.len(), flags, 0);
    }
    descs
}

fn parse_with(
    m: &GuestMemoryMmap,
    t: u32,
    sector: u64,
    descs: Vec<Descriptor>,
) -> Result<Request, Rejected> {
    m.write_slice(&blk_header(t, sector), GuestAddress(0x1000))
        .unwrap();
    request::parse(m, chain(descs), CAP)
}

/// Where the status byte is (if found) and why the chain was refused.
type Refusal = (Option<u64>, E);

fn refused(res: Result<Request, Rejected>) -> Refusal {
    let rej = res.unwrap_err();
    (rej.status.map(|a| a.0), rej.error)
}

#[test]
fn a_split_read_becomes_typed_segments() {
    let m = mem();
    let req = parse_with(
        &m,
        VIRTIO_BLK_T_IN,
        7,
        vec![r(0x1000, 16), w(0x4000, 1000), w(0x8000, 25)],
    )
    .unwrap();
    assert_eq!(req.status, GuestAddress(0x8000 + 24));
    let want = vec![
        Segment {
            addr: GuestAddress(0x4000),
            len: 1000,
        },
        Segment {
            addr: GuestAddress(0x8000),
            len: 24,
        },
    ];
    assert_eq!(
        req.kind,
        RequestKind::Read {
            sector: 7,
            len: 1024,
            data: want
        }
    );
}

#[test]
fn a_header_split_over_buffers_still_parses() {
    let m = mem();
    m.write_slice(&blk_header(VIRTIO_BLK_T_OUT, 9), GuestAddress(0x1000))
        .unwrap();
    // Header bytes 0..3 at 0x1000, 3..16 at 0x1003 via a second descriptor, data after them.
    let req = request::parse(
        &m,
        chain(vec![r(0x1000, 3), r(0x1003, 13 + 512), w(0x9000, 1)]),
        CAP,
    )
    .unwrap();
    let data = vec![Segment {
        addr: GuestAddress(0x1010),
        len: 512,
    }];
    assert_eq!(
        req.kind,
        RequestKind::Write {
            sector: 9,
            len: 512,
            data
        }
    );
}

#[test]
fn each_refusal_names_its_cause() {
    let m = mem();
    let s = Some(0x9000);
    let cases: Vec<(u32, u64, Vec<Descriptor>, Refusal)> = vec![
        (
            VIRTIO_BLK_T_IN,
            0,
            vec![r(0x1000, 16), r(0x4000, 512), w(0x9000, 1)],
            (s, E::UnexpectedReadableData(0)),
        ),
        (
            VIRTIO_BLK_T_OUT,
            0,
            vec![r(0x1000, 16), w(0x4000, 512), w(0x9000, 1)],
            (s, E::UnexpectedWritableData(1)),
        ),
        (
            VIRTIO_BLK_T_IN,
            0,
            vec![r(0x1000, 16), w(0x4000, 512), r(0x5000, 8), w(0x9000, 1)],
            (s, E::ReadableAfterWritable),
        ),
        (
            VIRTIO_BLK_T_IN,
            0,
            vec![r(0x1000, 16), w(0x4000, 100), w(0x9000, 1)],
            (s, E::NotSectorMultiple(100)),
        ),
        (
            VIRTIO_BLK_T_IN,
            u64::MAX,
            vec![r(0x1000, 16), w(0x4000, 512), w(0x9000, 1)],
            (s, E::SectorOverflow(u64::MAX)),
        ),
        (
            VIRTIO_BLK_T_IN,
            CAP - 1,
            vec![r(0x1000, 16), w(0x4000, 1024), w(0x9000, 1)],
            (
                s,
                E::BeyondCapacity {
                    sector: CAP - 1,
                    count: 2,
                    capacity: CAP,
                },
            ),
        ),
        (
            VIRTIO_BLK_T_IN,
            0,
            vec![r(0x1000, 16), w(0x4000, 512), r(0x9000, 1)],
            (None, E::NoStatusByte),
        ),
        (
            VIRTIO_BLK_T_IN,
            0,
            vec![r(0x1000, 16), w(0x4000, 512), w(0x9000, 0)],
            (None, E::NoStatusByte),
        ),
        (
            VIRTIO_BLK_T_IN,
            0,
            vec![r(0x1000, 8), w(0x9000, 1)],
            (s, E::HeaderTooShort(8)),
        ),
        (
            VIRTIO_BLK_T_IN,
            0,
            vec![r(0x1000, 16), w(0xff000, 0x2000), w(0x9000, 1)],
            (
                s,
                E::OutsideGuestMemory {
                    addr: 0xff000,
                    len: 0x2000,
                },
            ),
        ),
        (
            VIRTIO_BLK_T_IN,
            0,
            vec![r(0x1000, 16), w(u64::MAX - 10, 512), w(0x9000, 1)],
            (
                s,
                E::OutsideGuestMemory {
                    addr: u64::MAX - 10,
                    len: 512,
                },
            ),
        ),
        (
            VIRTIO_BLK_T_IN,
            0,
            vec![r(0x1000, 16), w(0x4000, SIZE_MAX + 512), w(0x9000, 1)],
            (s, E::DescriptorTooLarge(SIZE_MAX + 512)),
        ),
        (
            VIRTIO_BLK_T_FLUSH,
            0,
            vec![r(0x1000, 16), w(0x4000, 512), w(0x9000, 1)],
            (s, E::UnexpectedWritableData(4)),
        ),
        (
            VIRTIO_BLK_T_GET_ID,
            0,
            vec![r(0x1000, 16), w(0x9000, 1)],
            (s, E::NoIdBuffer),
        ),
        (
            VIRTIO_BLK_T_DISCARD,
            0,
            vec![r(0x1000, 16), w(0x9000, 1)],
            (s, E::Unsupported(11)),
        ),
    ];
    for (i, (t, sector, descs, want)) in cases.into_iter().enumerate() {
        assert_eq!(refused(parse_with(&m, t, sector, descs)), want, "case {i}");
    }
    assert_eq!(E::Unsupported(11).status(), UNSUPP);
    assert_eq!(E::NoIdBuffer.status(), IOERR);
}

#[test]
fn chains_that_do_not_end_are_dropped() {
    let m = mem();
    assert_eq!(
        refused(request::parse(&m, Vec::new(), CAP)),
        (None, E::EmptyChain)
    );
    // Last yielded descriptor still has NEXT: virtio-queue stopped on a loop or bad index.
    assert_eq!(
        refused(request::parse(&m, vec![r(0x1000, 16), w(0x9000, 1)], CAP)),
        (None, E::ChainBroken)
    );
    let long: Vec<_> = (0..=MAX_DESCRIPTORS as u64)
        .map(|i| w(0x4000 + i * 512, 512))
        .collect();
    assert_eq!(
        refused(request::parse(&m, chain(long), CAP)),
        (None, E::ChainTooLong)
    );
}

#[test]
fn parse_writes_nothing_to_guest_memory() {
    let m = mem();
    m.write_obj(0xabu8, GuestAddress(0x9000)).unwrap();
    let _ = parse_with(
        &m,
        VIRTIO_BLK_T_IN,
        u64::MAX,
        vec![r(0x1000, 16), w(0x4000, 512), w(0x9000, 1)],
    );
    assert_eq!(m.read_obj::<u8>(GuestAddress(0x9000)).unwrap(), 0xab);
}
