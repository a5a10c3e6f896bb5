"""End-to-end jobs, one file each, composed from kdcache's components (data, teachers, writer, ...)."""
