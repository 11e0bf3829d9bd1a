"""The file MONAI Label loads an app from (``monailabel start_server --app common/monailabel``)."""

from common.monailabel.app import CollectionApp

__all__ = ["CollectionApp"]
