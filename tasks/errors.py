"""The pipeline's exceptions. Each message says what to do about it."""


class PipelineError(RuntimeError):
    """Base class of every error a pipeline step raises on purpose."""


class ConfigError(PipelineError, ValueError):
    """A configuration value is invalid (raised at construction, before any work)."""


class DataError(PipelineError):
    """Input data is missing, unreadable, or lacks the expected columns or labels."""


class AssetError(PipelineError):
    """A demo asset could not be fetched or failed its checksum."""


class ExportError(PipelineError):
    """An exported model does not reproduce its source model."""


class PromotionFailed(PipelineError):
    """A candidate could not be put into service; the previous version keeps serving."""


class CompileError(PipelineError):
    """A TensorRT engine could not be built from the ONNX model."""


class TeacherError(PipelineError):
    """The run's teacher cannot be fetched, or is not a model the pipeline can fine-tune."""


class RegistryAccessDenied(PipelineError):
    """MLflow refused the credentials this process sent (or it sent none)."""
