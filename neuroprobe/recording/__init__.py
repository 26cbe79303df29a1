"""Recording: stream responses to HDF5 (schema, writer, reader, recorder)."""
from neuroprobe.recording.reader import Recording, open_recording
from neuroprobe.recording.recorder import Recorder, record

__all__ = ["Recorder", "Recording", "open_recording", "record"]
