"""Settings of the Django site used by tests/test_django.py and under gunicorn."""

import os

os.environ.setdefault("ADB_LOG_FILE", "")

SECRET_KEY = "tests-only"
DEBUG = False
ALLOWED_HOSTS = ["*"]
INSTALLED_APPS = ["aperturedb_pool.django"]
MIDDLEWARE: list = []
ROOT_URLCONF = "adb_django_site.urls"
DATABASES: dict = {}
USE_TZ = True
LOGGING_CONFIG = None

APERTUREDB = {
    "HOST": os.environ.get("ADB_TEST_HOST", "127.0.0.1"),
    "PORT": int(os.environ.get("ADB_TEST_PORT", "55555")),
    "USER": "admin",
    "PASSWORD": "admin",
    "USE_SSL": False,
    "MAX_SIZE": 8,
    "TIMEOUT": 20,
}
