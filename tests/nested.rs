//! Runs a scenario inside a software-emulated VM whose CPU has SVM, so Debian's cloud kernel gives
//! it a real /dev/kvm (this host's own /dev/kvm is kvm_pvm). Owned by the vmm work.
