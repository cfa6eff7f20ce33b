"""The error the converters raise: a :class:`bundles.errors.FileProblem` about a source file."""

from bundles.errors import FileProblem


class ConversionError(FileProblem):
    """A source checkpoint or k-means file could not be read or converted."""
