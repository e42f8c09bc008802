import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "adb_django_site.settings")

from django.core.wsgi import get_wsgi_application  # noqa: E402

application = get_wsgi_application()
