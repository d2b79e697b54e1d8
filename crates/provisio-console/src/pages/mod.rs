//! The console's pages, by section.

pub(crate) mod admin;
pub(crate) mod certificates;
pub(crate) mod enrollments;
pub(crate) mod overview;
pub(crate) mod registrations;

/// Page sizes of the lists.
pub(crate) const PAGE: u32 = 50;
