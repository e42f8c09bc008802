from django.urls import path

from adb_django_site import views

urlpatterns = [
    path("whoami", views.whoami),
    path("twice", views.twice),
    path("nodb", views.nodb),
    path("boom", views.boom),
    path("connector-fails", views.connector_fails),
    path("stream", views.stream),
    path("release-early", views.release_early),
]
