"""Ingest: receive CBF visibilities, convert, flag, average and emit the L0 streams."""
