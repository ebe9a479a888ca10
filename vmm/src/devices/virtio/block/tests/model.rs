//! Property tests: random request streams (mostly valid, some broken in one way) against a
//! shadow model of the disk that checks every read; and random garbage chains that must never
//! panic the device nor stop it serving.

use proptest::prelude::*;

use super::*;

const SECTORS: u64 = 64;
/// Scratch area for data buffers, well away from the rings and the header/status bytes.
const SCRATCH: u64 = DATA;
const SCRATCH_LEN: u64 = 4 << 20;

#[derive(Debug, Clone)]
enum Break {
    None,
    /// The data buffers get the wrong direction for the request type.
    FlipData,
    /// The status buffer is device-readable.
    StatusReadOnly,
    /// The status buffer is empty.
    StatusEmpty,
    /// One data buffer points past guest memory.
    DataOutside,
}

#[derive(Debug, Clone)]
struct Req {
    req_type: u32,
    sector: u64,
    len: u32,
    /// Cut points (fractions of `len`) where the data is split into buffers.
    cuts: Vec<u32>,
    /// Where each buffer goes inside its own 200-slot band of the scratch area (4 KiB slots),
    /// so no two buffers of one request overlap.
    slots: Vec<u16>,
    split_header: bool,
    fill: u8,
    brk: Break,
}

fn req() -> impl Strategy<Value = Req> {
    let req_type = prop_oneof![
        6 => Just(VIRTIO_BLK_T_IN),
        6 => Just(VIRTIO_BLK_T_OUT),
        1 => Just(VIRTIO_BLK_T_FLUSH),
        1 => Just(VIRTIO_BLK_T_GET_ID),
        1 => any::<u32>(),
    ];
    let sector = prop_oneof![8 => 0..SECTORS, 1 => SECTORS - 4..SECTORS + 4, 1 => any::<u64>()];
    let len = prop_oneof![8 => (0u32..=16).prop_map(|s| s * 512), 1 => 0u32..9000];
    let brk = prop_oneof![
        12 => Just(Break::None),
        1 => Just(Break::FlipData),
        1 => Just(Break::StatusReadOnly),
        1 => Just(Break::StatusEmpty),
        1 => Just(Break::DataOutside),
    ];
    (
        req_type,
        sector,
        len,
        proptest::collection::vec(0u32..1000, 0..4),
        proptest::collection::vec(0u16..197, 5),
        any::<bool>(),
        any::<u8>(),
        brk,
    )
        .prop_map(
            |(req_type, sector, len, cuts, slots, split_header, fill, brk)| Req {
                req_type,
                sector,
                len,
                cuts,
                slots,
                split_header,
                fill,
                brk,
            },
        )
}

/// The data buffers of `r`: `len` cut at its cut points, each placed in its own 4 KiB-aligned
/// slot.
fn data_bufs(r: &Req, write: bool) -> Vec<Buf> {
    let mut points: Vec<u32> = r
        .cuts
        .iter()
        .map(|c| (u64::from(r.len) * u64::from(*c) / 1000) as u32)
        .collect();
    points.push(0);
    points.push(r.len);
    points.sort_unstable();
    points.dedup();
    points
        .windows(2)
        .zip(r.slots.iter().enumerate())
        .map(|(w, (band, slot))| {
            let addr = SCRATCH + (band as u64 * 200 + u64::from(*slot)) * 4096;
            Buf {
                addr,
                len: w[1] - w[0],
                write,
            }
        })
        .collect()
}

enum Want {
    Status(u8),
    Dropped,
}

/// The device's contract, stated over the request's parameters rather than its descriptors.
fn predict(r: &Req) -> Want {
    match r.brk {
        Break::StatusReadOnly | Break::StatusEmpty => return Want::Dropped,
        Break::FlipData | Break::DataOutside if r.len > 0 => return Want::Status(IOERR),
        _ => {}
    }
    match r.req_type {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
            let whole = r.len.is_multiple_of(512);
            let in_range = r
                .sector
                .checked_add(u64::from(r.len) / 512)
                .is_some_and(|end| end <= SECTORS);
            Want::Status(if whole && in_range { OK } else { IOERR })
        }
        VIRTIO_BLK_T_FLUSH => Want::Status(if r.len == 0 { OK } else { IOERR }),
        VIRTIO_BLK_T_GET_ID => Want::Status(OK),
        _ => Want::Status(if r.len == 0 { UNSUPP } else { IOERR }),
    }
}

fn run_req(f: &mut Fixture, shadow: &mut [u8], r: &Req) -> Result<(), TestCaseError> {
    let is_out = r.req_type == VIRTIO_BLK_T_OUT;
    let is_get_id = r.req_type == VIRTIO_BLK_T_GET_ID;
    // Data direction follows the type (OUT readable, everything else writable), unless broken.
    let flip = matches!(r.brk, Break::FlipData);
    let data_write = !is_out ^ flip;
    // Types other than IN/OUT carry no data except GET_ID's id buffer.
    let mut r = r.clone();
    let known_io = r.req_type == VIRTIO_BLK_T_IN || is_out;
    if !known_io {
        r.len = if is_get_id { 20 } else { 0 };
        if matches!(r.brk, Break::FlipData | Break::DataOutside) && !is_get_id {
            r.brk = Break::None;
        }
    }
    let mut data = data_bufs(&r, data_write);
    if matches!(r.brk, Break::DataOutside) {
        if let Some(b) = data.first_mut() {
            b.addr = MEM_SIZE as u64;
        }
    }
    if is_out && !flip && !matches!(r.brk, Break::DataOutside) {
        for (i, b) in data.iter().enumerate() {
            let bytes = vec![r.fill.wrapping_add(i as u8); b.len as usize];
            f.mem.write_slice(&bytes, GuestAddress(b.addr)).unwrap();
        }
    }
    f.header(r.req_type, r.sector);
    f.reset_status();
    let mut bufs = if r.split_header {
        vec![Buf::r(HDR, 5), Buf::r(HDR + 5, 11)]
    } else {
        vec![Buf::r(HDR, 16)]
    };
    // A readable data buffer after the header, or a writable one before the status.
    bufs.extend(data.iter().copied());
    bufs.push(match r.brk {
        Break::StatusReadOnly => Buf::r(STATUS, 1),
        Break::StatusEmpty => Buf::w(STATUS, 0),
        _ => Buf::w(STATUS, 1),
    });
    let used = f.run(&bufs);
    let Some((_, used_len)) = used else {
        return Err(TestCaseError::fail("every chain gets a used entry"));
    };
    match predict(&r) {
        Want::Dropped => {
            prop_assert_eq!(used_len, 0);
            prop_assert_eq!(f.status(), 0xff);
        }
        Want::Status(st) => {
            prop_assert_eq!(f.status(), st, "request {:?}", r);
            if st != OK {
                prop_assert_eq!(used_len, 1);
                return Ok(());
            }
            let start = r.sector.wrapping_mul(512) as usize;
            match r.req_type {
                VIRTIO_BLK_T_IN => {
                    prop_assert_eq!(used_len, r.len + 1);
                    let mut at = start;
                    for b in &data {
                        let got = f.guest(b.addr, b.len as usize);
                        prop_assert_eq!(&got[..], &shadow[at..at + b.len as usize]);
                        at += b.len as usize;
                    }
                }
                VIRTIO_BLK_T_OUT => {
                    prop_assert_eq!(used_len, 1);
                    let mut at = start;
                    for b in &data {
                        let got = f.guest(b.addr, b.len as usize);
                        shadow[at..at + b.len as usize].copy_from_slice(&got);
                        at += b.len as usize;
                    }
                }
                _ => {}
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn every_read_matches_a_shadow_disk(reqs in proptest::collection::vec(req(), 1..24)) {
        let mut shadow = pattern(SECTORS as usize * 512);
        let mut f = Fixture::new(&shadow, false);
        for r in &reqs {
            run_req(&mut f, &mut shadow, r)?;
        }
        prop_assert_eq!(std::fs::read(&f.path).unwrap(), shadow);
    }

    #[test]
    fn garbage_chains_never_stop_the_device(
        chains in proptest::collection::vec(
            proptest::collection::vec((any::<u64>(), any::<u32>(), 0u16..8, any::<u16>(), any::<bool>()), 1..6),
            1..8),
        header in any::<[u8; 16]>(),
    ) {
        let content = pattern(SECTORS as usize * 512);
        let mut f = Fixture::new(&content, true);
        for descs in &chains {
            f.mem.write_slice(&header, GuestAddress(HDR)).unwrap();
            // Descriptors at slots 100.., pointing mostly into scratch memory or past the end.
            for (i, (addr, len, flags, next, near)) in descs.iter().enumerate() {
                let addr = if *near { SCRATCH + addr % SCRATCH_LEN } else { *addr };
                let next = if *near { 100 + next % 8 } else { *next };
                let d = RawDesc { addr, len: len % (1 << 21), flags: *flags, next };
                f.q.set_desc(&f.mem, 100 + i as u16, d).unwrap();
            }
            let before = f.q.used_idx(&f.mem).unwrap();
            f.q.publish(&f.mem, 100).unwrap();
            f.notify();
            prop_assert_eq!(f.q.used_idx(&f.mem).unwrap(), before.wrapping_add(1));
            let (st, _, data) = f.read(1, 1);
            prop_assert_eq!(st, OK);
            prop_assert_eq!(&data[..], &content[512..1024]);
        }
        // The disk is read-only: nothing a garbage chain did may have reached the file.
        prop_assert_eq!(std::fs::read(&f.path).unwrap(), content);
    }
}
