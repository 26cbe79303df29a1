"""Subjects: models with their preprocessing, sites and readouts, behind one registry."""
from neuroprobe.subjects.base import Batch, Site, SitePattern, Subject
from neuroprobe.subjects.registry import REGISTRY, SubjectSpec, default_device, get_spec, load_subject

__all__ = ["Batch", "Site", "SitePattern", "Subject", "REGISTRY", "SubjectSpec", "default_device", "get_spec", "load_subject"]
