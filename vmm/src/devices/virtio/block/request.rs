//! virtio-blk requests: `parse()` is pure and turns an untrusted descriptor chain into a typed
//! `Request` (or a rejection) with checked arithmetic; only `Request::process()` does I/O, and
//! only on ranges that `parse()` proved lie inside guest memory and inside the disk.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions, VolatileSlice};

use super::disk::{DiskBackend, DEVICE_ID_BYTES};

/// Bytes in a virtio-blk sector, whatever the disk's block size.
pub const SECTOR_SIZE: u64 = 512;
/// Size of `struct virtio_blk_outhdr` (type, ioprio, sector).
pub const HEADER_SIZE: u64 = 16;
/// Data segments per request we offer (VIRTIO_BLK_F_SEG_MAX): a 256-entry queue minus header
/// and status, like QEMU, so 1 MiB of scattered 4 KiB pages fits one request.
pub const SEG_MAX: u32 = 254;
/// Largest single descriptor we offer (VIRTIO_BLK_F_SIZE_MAX).
pub const SIZE_MAX: u32 = 1 << 20;
/// Descriptors in one chain: the data segments plus header and status.
pub const MAX_DESCRIPTORS: usize = SEG_MAX as usize + 2;
/// Data bytes one request may move; a driver honouring SEG_MAX and SIZE_MAX stays below it.
pub const MAX_DATA_BYTES: u64 = SEG_MAX as u64 * SIZE_MAX as u64;

/// Why a chain was refused. Each variant's text is the message logged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// the chain has no descriptors (head index out of range or table unreadable)
    #[error("the chain has no descriptors (head index out of range or table unreadable)")]
    EmptyChain,
    /// the chain has more than MAX_DESCRIPTORS descriptors
    #[error("the chain has more than {MAX_DESCRIPTORS} descriptors")]
    ChainTooLong,
    /// the chain stops on a descriptor that still has NEXT set (loop, bad index, bad table)
    #[error(
        "the chain stops on a descriptor that still has NEXT set (loop, bad index, bad table)"
    )]
    ChainBroken,
    /// a descriptor is larger than SIZE_MAX
    #[error("descriptor of {0} bytes is larger than {SIZE_MAX}")]
    DescriptorTooLarge(u32),
    /// a descriptor points outside guest memory
    #[error("descriptor [{addr:#x}, +{len}) is outside guest memory")]
    OutsideGuestMemory { addr: u64, len: u32 },
    /// a device-readable descriptor follows a device-writable one
    #[error("a device-readable descriptor follows a device-writable one")]
    ReadableAfterWritable,
    /// the last descriptor is not device-writable or is empty, so there is no status byte
    #[error("the last descriptor is not device-writable or is empty: no place for the status")]
    NoStatusByte,
    /// the device-readable part is shorter than the request header
    #[error("the device-readable part has {0} bytes, shorter than the 16-byte header")]
    HeaderTooShort(u64),
    /// the request carries device-readable data its type does not take
    #[error("a request of type {0} carries device-readable data")]
    UnexpectedReadableData(u32),
    /// the request carries device-writable data its type does not take
    #[error("a request of type {0} carries device-writable data")]
    UnexpectedWritableData(u32),
    /// the data length is not a multiple of 512
    #[error("data length {0} is not a multiple of 512")]
    NotSectorMultiple(u64),
    /// the request moves more data than the device accepts
    #[error("data length {0} is larger than {MAX_DATA_BYTES}")]
    TooMuchData(u64),
    /// the sector range overflows a u64
    #[error("sector {0} plus the data length overflows")]
    SectorOverflow(u64),
    /// the sector range ends past the disk
    #[error("sectors [{sector}, +{count}) end past the disk's {capacity} sectors")]
    BeyondCapacity {
        sector: u64,
        count: u64,
        capacity: u64,
    },
    /// a GET_ID request has no buffer for the id
    #[error("a GET_ID request has no buffer for the id")]
    NoIdBuffer,
    /// the request type is not one this device serves
    #[error("request type {0} is not supported")]
    Unsupported(u32),
    /// guest memory could not be read although its range was checked
    #[error("guest memory read failed at {0:#x}")]
    GuestMemory(u64),
}

impl RequestError {
    /// The status byte the guest gets for this refusal, if its status byte is locatable.
    pub fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) => VIRTIO_BLK_S_UNSUPP as u8,
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

/// A refused chain, with where its status byte is if that could be found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// Guest address of the status byte; `None` means the chain is dropped unanswered
    /// (returned to the guest with used length 0).
    pub status: Option<GuestAddress>,
    pub error: RequestError,
}

/// A piece of guest memory already checked to be mapped (for the direction it is used in).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// What a valid request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestKind {
    /// Read `len` bytes from `sector` into `data` (device-writable guest memory).
    Read {
        sector: u64,
        len: u64,
        data: Vec<Segment>,
    },
    /// Write `len` bytes from `data` (device-readable guest memory) at `sector`.
    Write {
        sector: u64,
        len: u64,
        data: Vec<Segment>,
    },
    /// Make completed writes durable.
    Flush,
    /// Write the device id into `data` (at most 20 bytes are written).
    GetId { len: u64, data: Vec<Segment> },
}

/// A validated request: safe to hand to `process()`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub kind: RequestKind,
    /// Guest address of the status byte (device-writable, in guest memory).
    pub status: GuestAddress,
}

impl Request {
    /// Bytes of disk data the request moves (0 for a flush or an id).
    pub fn data_len(&self) -> u64 {
        match &self.kind {
            RequestKind::Read { len, .. } | RequestKind::Write { len, .. } => *len,
            RequestKind::Flush | RequestKind::GetId { .. } => 0,
        }
    }
}

/// Outcome of `process()`: the status byte the guest gets and the used length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    pub status: u8,
    /// Bytes written into the chain's device-writable part, status byte included.
    pub used_len: u32,
}

/// Validate one descriptor chain (the descriptors in chain order, as virtio-queue yields them)
/// against guest memory and a disk of `capacity` sectors. Pure: reads guest memory, writes none.
pub fn parse<M: GuestMemory + ?Sized>(
    mem: &M,
    chain: impl IntoIterator<Item = Descriptor>,
    capacity: u64,
) -> Result<Request, Rejected> {
    let descs = collect_chain(chain)?;
    let status = locate_status(mem, &descs);
    let reject = |error| Rejected { status, error };
    let Some(status_addr) = status else {
        return Err(reject(RequestError::NoStatusByte));
    };
    let (readable, writable) = split_directions(mem, &descs).map_err(reject)?;
    let readable_len = total_len(&readable);
    // The status byte is the last writable byte; the writable bytes before it are data.
    let writable_data = total_len(&writable).saturating_sub(1);
    if readable_len < HEADER_SIZE {
        return Err(reject(RequestError::HeaderTooShort(readable_len)));
    }
    let (req_type, sector) = read_header(mem, &readable).map_err(reject)?;
    let payload = readable_len - HEADER_SIZE;
    let kind = match req_type {
        VIRTIO_BLK_T_IN => {
            if payload != 0 {
                return Err(reject(RequestError::UnexpectedReadableData(req_type)));
            }
            check_range(sector, writable_data, capacity).map_err(reject)?;
            RequestKind::Read {
                sector,
                len: writable_data,
                data: sub_segments(&writable, 0, writable_data),
            }
        }
        VIRTIO_BLK_T_OUT => {
            if writable_data != 0 {
                return Err(reject(RequestError::UnexpectedWritableData(req_type)));
            }
            check_range(sector, payload, capacity).map_err(reject)?;
            RequestKind::Write {
                sector,
                len: payload,
                data: sub_segments(&readable, HEADER_SIZE, payload),
            }
        }
        VIRTIO_BLK_T_FLUSH => {
            if payload != 0 {
                return Err(reject(RequestError::UnexpectedReadableData(req_type)));
            }
            if writable_data != 0 {
                return Err(reject(RequestError::UnexpectedWritableData(req_type)));
            }
            RequestKind::Flush
        }
        VIRTIO_BLK_T_GET_ID => {
            if payload != 0 {
                return Err(reject(RequestError::UnexpectedReadableData(req_type)));
            }
            if writable_data == 0 {
                return Err(reject(RequestError::NoIdBuffer));
            }
            let len = writable_data.min(DEVICE_ID_BYTES as u64);
            RequestKind::GetId {
                len,
                data: sub_segments(&writable, 0, len),
            }
        }
        other => return Err(reject(RequestError::Unsupported(other))),
    };
    Ok(Request {
        kind,
        status: status_addr,
    })
}

/// Take at most MAX_DESCRIPTORS descriptors and make sure the chain really ended.
fn collect_chain(chain: impl IntoIterator<Item = Descriptor>) -> Result<Vec<Descriptor>, Rejected> {
    let drop = |error| Rejected {
        status: None,
        error,
    };
    let mut descs = Vec::with_capacity(3);
    for desc in chain {
        if descs.len() == MAX_DESCRIPTORS {
            return Err(drop(RequestError::ChainTooLong));
        }
        descs.push(desc);
    }
    match descs.last() {
        None => Err(drop(RequestError::EmptyChain)),
        // virtio-queue ends iteration silently on loops and bad indices; NEXT still set on the
        // last descriptor is how that shows.
        Some(last) if last.has_next() => Err(drop(RequestError::ChainBroken)),
        Some(_) => Ok(descs),
    }
}

/// The status byte is the last byte of the last descriptor, if that one is device-writable,
/// non-empty and mapped.
fn locate_status<M: GuestMemory + ?Sized>(mem: &M, descs: &[Descriptor]) -> Option<GuestAddress> {
    let last = descs.last()?;
    if !last.is_write_only() || last.len() == 0 {
        return None;
    }
    let addr = last.addr().checked_add(u64::from(last.len()) - 1)?;
    mem.check_range(addr, 1, Permissions::Write).then_some(addr)
}

/// Check each descriptor's size and mapping, and that readable ones come first.
fn split_directions<M: GuestMemory + ?Sized>(
    mem: &M,
    descs: &[Descriptor],
) -> Result<(Vec<Segment>, Vec<Segment>), RequestError> {
    let mut readable = Vec::with_capacity(descs.len());
    let mut writable = Vec::with_capacity(2);
    for desc in descs {
        let (addr, len) = (desc.addr(), desc.len());
        if len > SIZE_MAX {
            return Err(RequestError::DescriptorTooLarge(len));
        }
        let perm = if desc.is_write_only() {
            Permissions::Write
        } else {
            Permissions::Read
        };
        // len <= SIZE_MAX, so it fits a usize.
        let mapped =
            addr.checked_add(u64::from(len)).is_some() && mem.check_range(addr, len as usize, perm);
        if !mapped {
            return Err(RequestError::OutsideGuestMemory { addr: addr.0, len });
        }
        let seg = Segment { addr, len };
        if desc.is_write_only() {
            writable.push(seg);
        } else if writable.is_empty() {
            readable.push(seg);
        } else {
            return Err(RequestError::ReadableAfterWritable);
        }
    }
    Ok((readable, writable))
}

fn total_len(segs: &[Segment]) -> u64 {
    // At most MAX_DESCRIPTORS segments of at most SIZE_MAX bytes: no overflow in u64.
    segs.iter().map(|s| u64::from(s.len)).sum()
}

/// The byte range [start, start + len) of the stream formed by `segs`, as segments.
fn sub_segments(segs: &[Segment], start: u64, len: u64) -> Vec<Segment> {
    let mut out = Vec::with_capacity(segs.len());
    let mut skip = start;
    let mut left = len;
    for seg in segs {
        if left == 0 {
            break;
        }
        let seg_len = u64::from(seg.len);
        if skip >= seg_len {
            skip -= seg_len;
            continue;
        }
        let take = (seg_len - skip).min(left);
        // skip < seg_len <= SIZE_MAX and the segment was checked to be mapped, so neither the
        // address nor the u32 conversion can overflow.
        if let (Some(addr), Ok(take32)) = (seg.addr.checked_add(skip), u32::try_from(take)) {
            out.push(Segment { addr, len: take32 });
        }
        left -= take;
        skip = 0;
    }
    out
}

/// Read type and sector from the first 16 readable bytes, wherever the driver split them.
fn read_header<M: GuestMemory + ?Sized>(
    mem: &M,
    readable: &[Segment],
) -> Result<(u32, u64), RequestError> {
    let mut hdr = [0u8; HEADER_SIZE as usize];
    let mut filled = 0usize;
    for seg in sub_segments(readable, 0, HEADER_SIZE) {
        let end = filled + seg.len as usize;
        let dst = hdr
            .get_mut(filled..end)
            .ok_or(RequestError::GuestMemory(seg.addr.0))?;
        mem.read_slice(dst, seg.addr)
            .map_err(|_| RequestError::GuestMemory(seg.addr.0))?;
        filled = end;
    }
    let [t0, t1, t2, t3, _, _, _, _, s0, s1, s2, s3, s4, s5, s6, s7] = hdr;
    Ok((
        u32::from_le_bytes([t0, t1, t2, t3]),
        u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]),
    ))
}

/// `len` bytes from `sector` must be whole sectors inside a disk of `capacity` sectors.
fn check_range(sector: u64, len: u64, capacity: u64) -> Result<(), RequestError> {
    if !len.is_multiple_of(SECTOR_SIZE) {
        return Err(RequestError::NotSectorMultiple(len));
    }
    if len > MAX_DATA_BYTES {
        return Err(RequestError::TooMuchData(len));
    }
    let count = len / SECTOR_SIZE;
    let end = sector
        .checked_add(count)
        .ok_or(RequestError::SectorOverflow(sector))?;
    if end > capacity {
        return Err(RequestError::BeyondCapacity {
            sector,
            count,
            capacity,
        });
    }
    Ok(())
}

impl Request {
    /// Do the I/O. Backend errors become an IOERR status; this never panics on guest input.
    /// The status byte itself is written by the caller (it owns the used ring too).
    pub fn process<M>(&self, mem: &M, disk: &dyn DiskBackend) -> Completion
    where
        M: GuestMemory<Bitmap = ()> + ?Sized,
    {
        let ok = |data_len: u64| Completion {
            status: VIRTIO_BLK_S_OK as u8,
            // data_len <= MAX_DATA_BYTES < u32::MAX.
            used_len: u32::try_from(data_len.saturating_add(1)).unwrap_or(u32::MAX),
        };
        let ioerr = Completion {
            status: VIRTIO_BLK_S_IOERR as u8,
            used_len: 1,
        };
        match &self.kind {
            RequestKind::Read { sector, len, data } => {
                let res = byte_offset(*sector).and_then(|off| {
                    guest_slices(mem, data, Permissions::Write)
                        .and_then(|s| disk.read_to_guest(off, &s))
                });
                match res {
                    Ok(()) => ok(*len),
                    Err(e) => {
                        tracing::warn!(sector, len, error = %e, "virtio-blk read failed");
                        ioerr
                    }
                }
            }
            RequestKind::Write { sector, len, data } => {
                if disk.read_only() {
                    return ioerr;
                }
                let res = byte_offset(*sector).and_then(|off| {
                    guest_slices(mem, data, Permissions::Read)
                        .and_then(|s| disk.write_from_guest(off, &s))
                });
                match res {
                    Ok(()) => ok(0),
                    Err(e) => {
                        tracing::warn!(sector, len, error = %e, "virtio-blk write failed");
                        ioerr
                    }
                }
            }
            RequestKind::Flush => match disk.flush() {
                Ok(()) => ok(0),
                Err(e) => {
                    tracing::warn!(error = %e, "virtio-blk flush failed");
                    ioerr
                }
            },
            RequestKind::GetId { len, data } => {
                let mut id = [0u8; DEVICE_ID_BYTES];
                let src = disk.device_id();
                for (d, s) in id.iter_mut().zip(src.as_bytes()) {
                    *d = *s;
                }
                let mut at = 0usize;
                for seg in data {
                    let end = at + seg.len as usize;
                    let Some(chunk) = id.get(at..end) else {
                        return ioerr;
                    };
                    if mem.write_slice(chunk, seg.addr).is_err() {
                        return ioerr;
                    }
                    at = end;
                }
                ok(*len)
            }
        }
    }
}

/// Byte offset of `sector`; parse() already proved it fits, this keeps hand-built requests safe.
fn byte_offset(sector: u64) -> std::io::Result<u64> {
    sector.checked_mul(SECTOR_SIZE).ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "sector offset overflows")
    })
}

/// Guest memory behind `segs` as volatile slices (several per segment where it crosses regions).
fn guest_slices<'a, M>(
    mem: &'a M,
    segs: &[Segment],
    perm: Permissions,
) -> std::io::Result<Vec<VolatileSlice<'a>>>
where
    M: GuestMemory<Bitmap = ()> + ?Sized,
{
    let mut out = Vec::with_capacity(segs.len());
    for seg in segs {
        let iter = mem
            .get_slices(seg.addr, seg.len as usize, perm)
            .map_err(std::io::Error::other)?;
        for slice in iter {
            out.push(slice.map_err(std::io::Error::other)?);
        }
    }
    Ok(out)
}
