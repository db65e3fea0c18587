//! Address-range dispatch for port I/O and MMIO exits: each device owns a range and sees
//! offsets into it, never absolute addresses.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device on a bus.
pub trait BusDevice: Send {
    /// A read of `data.len()` bytes at `offset` within the device's range.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// A write of `data` at `offset` within the device's range.
    fn write(&mut self, offset: u64, data: &[u8]);
    /// A short name for counters and logs.
    fn name(&self) -> &'static str {
        "device"
    }
    /// The device's counters (bytes, requests, ...), for the control API.
    fn counters(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
}

/// One device's counters, as [`Bus::counters`] reports them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceCounters {
    /// Where the device sits on its bus.
    pub base: u64,
    /// Its name.
    pub name: &'static str,
    /// Its counters.
    pub counters: Vec<(&'static str, u64)>,
}

/// Errors while placing a device on a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The range overlaps a device already there, or is empty.
    #[error("bus range {base:#x}+{len:#x} overlaps another device or is empty")]
    Overlap {
        /// Start of the range.
        base: u64,
        /// Its length.
        len: u64,
    },
}

type Entry = (u64, Arc<Mutex<dyn BusDevice>>);

/// A set of non-overlapping device ranges.
#[derive(Default, Clone)]
pub struct Bus {
    devices: BTreeMap<u64, Entry>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ranges: Vec<_> = self.devices.iter().map(|(b, (l, _))| (*b, *l)).collect();
        f.debug_struct("Bus").field("ranges", &ranges).finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `dev` at `base..base+len`.
    pub fn insert(
        &mut self,
        base: u64,
        len: u64,
        dev: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::Overlap { base, len })?;
        let before = self.devices.range(..end).next_back();
        if let Some((b, (l, _))) = before {
            if b + l > base {
                return Err(BusError::Overlap { base, len });
            }
        }
        self.devices.insert(base, (len, dev));
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, &Arc<Mutex<dyn BusDevice>>)> {
        let (base, (len, dev)) = self.devices.range(..=addr).next_back()?;
        (addr - base < *len).then_some((addr - base, dev))
    }

    /// Every device's counters, in address order.
    pub fn counters(&self) -> Vec<DeviceCounters> {
        self.devices
            .iter()
            .map(|(base, (_, dev))| {
                let d = dev.lock().expect("device lock poisoned");
                DeviceCounters {
                    base: *base,
                    name: d.name(),
                    counters: d.counters(),
                }
            })
            .collect()
    }

    /// Dispatches a read; false if no device is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((off, dev)) => {
                dev.lock().expect("device lock poisoned").read(off, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; false if no device is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((off, dev)) => {
                dev.lock().expect("device lock poisoned").write(off, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Probe {
        last_write: Option<(u64, Vec<u8>)>,
    }
    impl BusDevice for Probe {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(u8::try_from(offset).unwrap());
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_write = Some((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_with_offsets_and_misses_outside() {
        let mut bus = Bus::new();
        let p = Arc::new(Mutex::new(Probe::default()));
        bus.insert(0x3f8, 8, p.clone()).unwrap();
        let mut d = [0u8; 1];
        assert!(bus.read(0x3fa, &mut d));
        assert_eq!(d, [2]);
        assert!(bus.write(0x3ff, &[7]));
        assert_eq!(p.lock().unwrap().last_write, Some((7, vec![7])));
        assert!(!bus.read(0x400, &mut d));
        assert!(!bus.write(0x3f7, &[1]));
    }

    #[test]
    fn overlapping_ranges_are_refused() {
        let mut bus = Bus::new();
        let p = Arc::new(Mutex::new(Probe::default()));
        bus.insert(0x100, 0x10, p.clone()).unwrap();
        assert!(bus.insert(0x10f, 1, p.clone()).is_err());
        assert!(bus.insert(0xf8, 9, p.clone()).is_err());
        assert!(bus.insert(0x200, 0, p.clone()).is_err());
        assert!(bus.insert(u64::MAX, 2, p.clone()).is_err());
        bus.insert(0x110, 1, p.clone()).unwrap();
        bus.insert(0xf0, 0x10, p).unwrap();
    }
}
