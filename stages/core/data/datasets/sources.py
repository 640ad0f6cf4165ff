"""Where each dataset officially comes from (docs/datasets.md has the same table): what `langdml fetch-data
--download` fetches, or, where no direct download exists, how to get it by hand."""

from __future__ import annotations

from stages.core.data.download import Archive, Source

KARPATHY = "https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip"

SOURCES: dict[str, Source] = {
    "cub200": Source(
        "cub200",
        marker="images.txt",
        homepage="https://www.vision.caltech.edu/datasets/cub_200_2011/",
        licence="for research and non-commercial use (Caltech); the images remain their Flickr owners'",
        archives=(
            Archive(
                "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz",
                "md5:97eceeb196236b17998738112f37df78",  # the MD5 CaltechDATA publishes (no SHA-256 is)
                "1.1 GB",
                strip=1,  # CUB_200_2011/... -> dataset.root/...
            ),
        ),
    ),
    "sop": Source(
        "sop",
        marker="Ebay_train.txt",
        homepage="https://cvgl.stanford.edu/projects/lifted_struct/",
        licence="for research use (Stanford CVGL); the images are eBay listings'",
        archives=(
            Archive(
                "http://ftp.cs.stanford.edu/cs/cvgl/Stanford_Online_Products.zip",
                "md5:7f73d41a2f44250d4779881525aea32e",  # the MD5 the dataset's loaders check (none is published)
                "2.9 GB",
                strip=1,
            ),
        ),
    ),
    "cars196": Source(
        "cars196",
        marker="cars_annos.mat",
        homepage="https://ai.stanford.edu/~jkrause/cars/car_dataset.html",
        licence="for research use (Stanford); the images remain their owners'",
        manual=(
            "its official files (ai.stanford.edu/~jkrause/car196/car_ims.tgz and cars_annos.mat) have been offline "
            "since 2023; unpack car_ims/ beside cars_annos.mat from a copy you trust into dataset.root, or put one "
            "folder per class there (docs/datasets.md)"
        ),
    ),
    "coco": Source(
        "coco",
        marker="dataset_coco.json",
        homepage="https://cocodataset.org",
        licence="annotations CC BY 4.0 (COCO Consortium); images under their Flickr owners' terms; Karpathy's splits",
        archives=(
            Archive(KARPATHY, None, "36 MB", members=("dataset_coco.json",)),
            Archive("http://images.cocodataset.org/zips/train2014.zip", None, "13 GB"),
            Archive("http://images.cocodataset.org/zips/val2014.zip", None, "6.2 GB"),
        ),
    ),
    "flickr30k": Source(
        "flickr30k",
        marker="dataset_flickr30k.json",
        homepage="https://shannon.cs.illinois.edu/DenotationGraph/",
        licence="for non-commercial research (the request form's terms); images under their Flickr owners' terms",
        manual=(
            "the images are given on request at shannon.cs.illinois.edu/DenotationGraph: put flickr30k-images/ and "
            f"dataset_flickr30k.json (from Karpathy's {KARPATHY}) into imagetext.data.root"
        ),
    ),
    "precomp": Source(
        "precomp",
        marker="train_ims.npy",
        homepage="https://github.com/woodfrog/vse_infty",
        licence="the BUTD features' authors' terms (SCAN / VSE-infinity); COCO's and Flickr30K's for the captions",
        manual=(
            "the BUTD region features (coco_precomp, f30k_precomp: {train,testall}_ims.npy + _caps.txt) are shared "
            "by SCAN / VSE-infinity on Google Drive (see github.com/woodfrog/vse_infty, 'Data'); unpack one into "
            "imagetext.data.root"
        ),
    ),
}
