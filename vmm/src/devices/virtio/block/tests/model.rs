//! Property tests: random request streams against a shadow model of the disk.
