"""Dataset readers and validators for the real on-disk formats (``../shared/datasets.md``):
COCONut-PanCap (``pancap``) and ViCaS (``vicas``). A reader lists work items cheaply on the
driver and reads/validates one sample at a time on a worker; a failed check raises
:class:`SampleError` naming the check, the sample and the file, which the curation stage turns
into a quarantine row."""

from .errors import SampleError

__all__ = ["SampleError"]
