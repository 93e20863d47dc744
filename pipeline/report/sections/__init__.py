"""The sections of the report page, one module each, in page order: run, curation, training,
evaluation, samples, lineage. Each is a function ``section(page: Page) -> str``."""
