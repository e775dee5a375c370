"""Skip-TS as a MONAI Deploy App SDK application (``monai-deploy-app-sdk`` 4.0, on Holoscan): see
:mod:`monai_skipts.deploy.app`. The SDK is not a dependency of this package: install it in its own
environment (it pulls ``holoscan-cu13``, CuPy and the CUDA Python bindings; it runs on a CPU-only
machine too). Nothing here is imported by the rest of the package."""
