//! The virtio-rng device: one request queue, no configuration space, no features beyond
//! VERSION_1 (and EVENT_IDX).

use std::fs::File;
use std::io;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemory;

use super::handler::{self, EntropySource, RngCounters};
use crate::devices::virtio::{QueueError, VirtioDevice, VIRTIO_F_VERSION_1};

/// virtio device id of the entropy device.
pub(crate) const RNG_DEVICE_TYPE: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
/// Size of the request queue.
pub(crate) const RNG_QUEUE_SIZE: u16 = 256;
const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

/// The virtio-rng device.
pub struct Rng<S: EntropySource = File> {
    source: S,
    counters: RngCounters,
    acked_features: u64,
}

impl<S: EntropySource> std::fmt::Debug for Rng<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rng")
            .field("counters", &self.counters)
            .finish()
    }
}

impl Rng<File> {
    /// An rng reading the host's /dev/urandom.
    pub(crate) fn from_urandom() -> io::Result<Self> {
        Ok(Self::new(File::open("/dev/urandom")?))
    }
}

impl<S: EntropySource> Rng<S> {
    /// An rng reading `source`.
    pub fn new(source: S) -> Self {
        Self {
            source,
            counters: RngCounters::default(),
            acked_features: 0,
        }
    }

    /// Counters so far.
    pub fn counters(&self) -> RngCounters {
        self.counters
    }
}

impl<M: GuestMemory, S: EntropySource> VirtioDevice<M> for Rng<S> {
    fn device_type(&self) -> u32 {
        RNG_DEVICE_TYPE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[RNG_QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX
    }

    fn activate(&mut self, acked_features: u64) {
        self.acked_features = acked_features;
    }

    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &M,
    ) -> Result<bool, QueueError> {
        if index != 0 {
            return Ok(false);
        }
        queue.set_event_idx(self.acked_features & VIRTIO_RING_F_EVENT_IDX != 0);
        handler::process_requests(queue, mem, &mut self.source, &mut self.counters)
    }

    fn reset(&mut self) {
        self.acked_features = 0;
    }

    fn name(&self) -> &'static str {
        "virtio-rng"
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let c = self.counters;
        vec![
            ("requests", c.requests),
            ("bytes", c.bytes),
            ("bad_descriptors", c.bad_descriptors),
            ("source_errors", c.source_errors),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::QueueOwnedT;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    /// A deterministic source: 0, 1, 2, ... (wrapping).
    struct Counting(u8);
    impl EntropySource for Counting {
        fn fill(&mut self, buf: &mut [u8]) -> io::Result<()> {
            for b in buf {
                *b = self.0;
                self.0 = self.0.wrapping_add(1);
            }
            Ok(())
        }
    }

    struct Broken;
    impl EntropySource for Broken {
        fn fill(&mut self, _: &mut [u8]) -> io::Result<()> {
            Err(io::Error::other("no entropy"))
        }
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    #[allow(clippy::cast_possible_truncation)] // descriptor flags are 16-bit values
    const W: u16 = VRING_DESC_F_WRITE as u16;
    #[allow(clippy::cast_possible_truncation)]
    const N: u16 = VRING_DESC_F_NEXT as u16;

    fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
    }

    fn used(q: &MockSplitQueue<GuestMemoryMmap>, i: u16) -> (u32, u32) {
        let e = q.used().ring().ref_at(usize::from(i)).unwrap().load();
        (e.id(), e.len())
    }

    fn run<S: EntropySource>(
        rng: &mut Rng<S>,
        mem: &GuestMemoryMmap,
        mq: &MockSplitQueue<GuestMemoryMmap>,
    ) -> (Queue, Result<bool, QueueError>) {
        let mut queue: Queue = mq.create_queue().unwrap();
        let r = VirtioDevice::<GuestMemoryMmap>::process_queue(rng, 0, &mut queue, mem);
        (queue, r)
    }

    #[test]
    fn fills_write_only_buffers_and_reports_their_length() {
        let m = mem();
        let mq = MockSplitQueue::new(&m, 16);
        mq.add_desc_chains(&[desc(0x8000, 16, W | N, 1), desc(0x9000, 8, W, 0)], 0)
            .unwrap();
        let mut rng = Rng::new(Counting(0));
        let (_, r) = run(&mut rng, &m, &mq);
        assert!(r.unwrap(), "the driver must be interrupted");
        assert_eq!(mq.used().idx().load(), 1);
        assert_eq!(used(&mq, 0), (0, 24));
        let mut a = [0u8; 16];
        m.read_slice(&mut a, GuestAddress(0x8000)).unwrap();
        assert_eq!(
            a,
            core::array::from_fn::<u8, 16, _>(|i| u8::try_from(i).unwrap())
        );
        let mut b = [0u8; 8];
        m.read_slice(&mut b, GuestAddress(0x9000)).unwrap();
        assert_eq!(
            b,
            core::array::from_fn::<u8, 8, _>(|i| 16 + u8::try_from(i).unwrap())
        );
        assert_eq!(
            rng.counters(),
            RngCounters {
                requests: 1,
                bytes: 24,
                ..Default::default()
            }
        );
    }

    #[test]
    fn several_chains_are_all_served() {
        let m = mem();
        let mq = MockSplitQueue::new(&m, 16);
        mq.add_desc_chains(
            &[
                desc(0x8000, 4, W, 0),
                desc(0x8100, 4, W, 0),
                desc(0x8200, 4, W, 0),
            ],
            0,
        )
        .unwrap();
        let mut rng = Rng::new(Counting(0));
        let (_, r) = run(&mut rng, &m, &mq);
        assert!(r.unwrap());
        assert_eq!(mq.used().idx().load(), 3);
        assert_eq!(rng.counters().bytes, 12);
    }

    #[test]
    fn read_only_descriptor_ends_the_request_without_writing() {
        let m = mem();
        let mq = MockSplitQueue::new(&m, 16);
        m.write_slice(&[0xaa; 8], GuestAddress(0x8000)).unwrap();
        mq.add_desc_chains(&[desc(0x8000, 8, 0, 0)], 0).unwrap();
        let mut rng = Rng::new(Counting(0));
        let (_, r) = run(&mut rng, &m, &mq);
        assert!(r.is_ok());
        assert_eq!(used(&mq, 0), (0, 0));
        let mut a = [0u8; 8];
        m.read_slice(&mut a, GuestAddress(0x8000)).unwrap();
        assert_eq!(a, [0xaa; 8], "a read-only buffer must not be written");
        assert_eq!(rng.counters().bad_descriptors, 1);
    }

    #[test]
    fn buffer_outside_guest_memory_is_refused_not_a_panic() {
        let m = mem();
        let mq = MockSplitQueue::new(&m, 16);
        // Straddles the end of RAM, then lies wholly beyond it, then wraps the address space.
        mq.add_desc_chains(
            &[
                desc(0xf_fff0, 0x100, W, 0),
                desc(0x4000_0000, 16, W, 0),
                desc(u64::MAX - 4, 16, W, 0),
            ],
            0,
        )
        .unwrap();
        let mut rng = Rng::new(Counting(0));
        let (_, r) = run(&mut rng, &m, &mq);
        assert!(r.is_ok());
        assert_eq!(mq.used().idx().load(), 3);
        for i in 0..3 {
            assert_eq!(used(&mq, i).1, 0, "request {i} wrote nothing");
        }
        assert_eq!(rng.counters().bad_descriptors, 3);
    }

    #[test]
    fn huge_buffer_is_filled_only_up_to_the_per_request_cap() {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        let mq = MockSplitQueue::new(&m, 16);
        mq.add_desc_chains(&[desc(0x10_0000, 0x20_0000, W, 0)], 0)
            .unwrap();
        let mut rng = Rng::new(Counting(0));
        let (_, r) = run(&mut rng, &m, &mq);
        assert!(r.is_ok());
        assert_eq!(used(&mq, 0).1, handler::MAX_BYTES_PER_REQUEST);
    }

    #[test]
    fn descriptor_index_out_of_range_and_loops_do_not_panic() {
        let m = mem();
        let mq = MockSplitQueue::new(&m, 16);
        // next = 200 is beyond the 16-entry table; the second chain loops on itself.
        mq.add_desc_chains(&[desc(0x8000, 4, W | N, 200)], 0)
            .unwrap();
        mq.add_desc_chains(&[desc(0x8100, 4, W | N, 1)], 1).unwrap();
        let mut rng = Rng::new(Counting(0));
        let (_, r) = run(&mut rng, &m, &mq);
        assert!(r.is_ok());
        assert_eq!(mq.used().idx().load(), 2);
        // What was valid before the bad link was served.
        assert!(used(&mq, 0).1 <= 4);
    }

    #[test]
    fn broken_avail_index_is_a_queue_error() {
        let m = mem();
        let mq = MockSplitQueue::new(&m, 16);
        // The driver claims 1000 new entries on a 16-entry ring.
        mq.avail().idx().store(1000);
        let mut rng = Rng::new(Counting(0));
        let (_, r) = run(&mut rng, &m, &mq);
        assert!(r.is_err(), "an impossible avail index must fail the queue");
    }

    #[test]
    fn failing_source_returns_the_request_empty() {
        let m = mem();
        let mq = MockSplitQueue::new(&m, 16);
        mq.add_desc_chains(&[desc(0x8000, 8, W, 0)], 0).unwrap();
        let mut rng = Rng::new(Broken);
        let (_, r) = run(&mut rng, &m, &mq);
        assert!(r.is_ok());
        assert_eq!(used(&mq, 0), (0, 0));
        assert_eq!(rng.counters().source_errors, 1);
    }

    #[test]
    fn nothing_available_means_no_interrupt() {
        let m = mem();
        let mq = MockSplitQueue::new(&m, 16);
        let mut rng = Rng::new(Counting(0));
        let (mut q, r) = run(&mut rng, &m, &mq);
        assert!(!r.unwrap());
        assert!(q.iter(&m).unwrap().next().is_none());
    }

    #[test]
    fn offers_version_1_and_one_queue() {
        let rng = Rng::new(Counting(0));
        let d: &dyn VirtioDevice<GuestMemoryMmap> = &rng;
        assert_eq!(d.device_type(), 4);
        assert_ne!(d.features() & VIRTIO_F_VERSION_1, 0);
        assert_eq!(d.queue_max_sizes(), &[RNG_QUEUE_SIZE]);
    }
}
