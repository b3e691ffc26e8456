"""Small helpers shared by the library: atomic file writes, packing, modules, seeding."""
