"""``python -m monai_skipts.deploy -i <DICOM folder> -o <output folder> -m <model.pt>``."""

from monai_skipts.deploy.app import main

if __name__ == "__main__":
    main()
