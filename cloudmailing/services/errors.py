"""Domain errors; the XML-RPC surface maps each to a Fault code (HTTP-like, see API.md)."""


class ServiceError(Exception):
    """Base class: ``code`` is the fault code the API answers with."""

    code = 500


class BadRequest(ServiceError):
    code = 400


class NotFound(ServiceError):
    code = 404


class InvalidValue(ServiceError):
    code = 406
